"""The lab's per-daemon samples, against a daemon API answered in memory (httpx's
MockTransport): no namespaces needed."""

from __future__ import annotations

import httpx

from benchmarks.lab.run import _daemon_sample


def api(status: dict | None) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/status"
        return httpx.Response(503) if status is None else httpx.Response(200, json=status)
    return httpx.Client(transport=httpx.MockTransport(answer), base_url="http://daemon")


def test_a_sample_sums_the_swarms_of_every_session():
    swarm = {"missing": 10, "pickable": 2, "requested": 4, "origin": 1, "origin_queued": 3,
             "free_peers": 5}
    status = {"origin_bytes": 7, "bytes_to_peers": 9,
              "sessions": [{"swarm": swarm},
                           {"swarm": {key: 1 for key in swarm}},
                           {"swarm": None}]}  # not started yet
    origin, to_peers, summed = _daemon_sample(api(status))
    assert (origin, to_peers) == (7, 9)
    assert summed == {key: value + 1 for key, value in swarm.items()}


def test_a_daemon_that_does_not_answer_gives_no_sample():
    assert _daemon_sample(api(None)) is None
    assert _daemon_sample(api({"origin_bytes": 1})) is None  # not a status
