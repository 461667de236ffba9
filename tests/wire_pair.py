"""Two PeerConnections joined by an in-memory link (h11's ``ConnectionPair``): what one side
sends, the other receives, cut into chunks as the test chooses. No sockets, no trio."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from p2pull.wire import NEED_DATA, ConnectionClosed, PeerConnection

NODE_A = "a0" * 16
NODE_B = "b1" * 16
CHALLENGE_A = bytes(range(32))
CHALLENGE_B = bytes(range(32, 64))
SECRET = b"the cluster secret"
CLUSTER = "lab"

Split = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


class ConnectionPair:
    """Sides ``"a"`` and ``"b"``. Sending only queues bytes on the link; ``deliver()`` moves
    them (both ways, until the link is quiet) and returns the events each side saw. Errors
    raised by a side's ``next_event`` propagate out of ``deliver()``."""

    def __init__(self, *, secrets: tuple[bytes, bytes] = (SECRET, SECRET),
                 clusters: tuple[str, str] = (CLUSTER, CLUSTER),
                 nodes: tuple[str, str] = (NODE_A, NODE_B),
                 ports: tuple[int, int] = (7001, 7002), allocate: tuple = (None, None),
                 racks: tuple[str, str] = ("", ""), split: Split = whole):
        self.conn = {
            "a": PeerConnection(nodes[0], clusters[0], secrets[0], CHALLENGE_A, ports[0],
                                allocate=allocate[0], rack=racks[0]),
            "b": PeerConnection(nodes[1], clusters[1], secrets[1], CHALLENGE_B, ports[1],
                                allocate=allocate[1], rack=racks[1]),
        }
        self.split = split
        #: bytes each side sent that the other has not received yet
        self.link = {"a": bytearray(), "b": bytearray()}
        #: every byte each side ever sent, for replaying to a fresh connection
        self.sent = {"a": bytearray(), "b": bytearray()}

    @staticmethod
    def other(side: str) -> str:
        return "b" if side == "a" else "a"

    def write(self, side: str, data: bytes | bytearray | memoryview) -> None:
        self.link[side] += data
        self.sent[side] += data

    def start(self) -> None:
        for side in ("a", "b"):
            self.write(side, self.conn[side].start())

    def handshake(self) -> dict[str, list]:
        self.start()
        return self.deliver()

    def send(self, side: str, *messages) -> None:
        for message in messages:
            self.write(side, self.conn[side].send(message))

    def send_piece(self, side: str, blob: str, index: int, checksum: bytes, payload) -> None:
        for buffer in self.conn[side].send_piece(blob, index, checksum, payload):
            self.write(side, buffer)

    def close(self, side: str) -> list:
        """``side`` closes its end: the other side receives the end of the stream."""
        events: dict[str, list] = {"a": [], "b": []}
        receiver = self.other(side)
        self.conn[receiver].receive_data(b"")
        self._drain(receiver, events)
        return events[receiver]

    def deliver(self) -> dict[str, list]:
        events: dict[str, list] = {"a": [], "b": []}
        while any(self.link.values()):
            for sender in ("a", "b"):
                data = bytes(self.link[sender])
                self.link[sender].clear()
                if not data:
                    continue
                receiver = self.other(sender)
                for chunk in self.split(data):
                    self.conn[receiver].receive_data(chunk)
                    self._drain(receiver, events)
        return events

    def _drain(self, side: str, events: dict[str, list]) -> None:
        conn = self.conn[side]
        while True:
            event = conn.next_event()
            if out := conn.data_to_send():
                self.write(side, out)
            if event is NEED_DATA:
                return
            events[side].append(event)
            if isinstance(event, ConnectionClosed):
                return


def events_of(conn: PeerConnection, chunks: Iterable[bytes]) -> list:
    """Feed ``chunks`` to ``conn`` one by one, collecting events until each NEED_DATA."""
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events
    return events
