"""Which chunks of a blob a node holds: one bit per chunk, most significant bit first (the
order peers exchange on the wire)."""

from __future__ import annotations

from typing import Iterator

#: byte -> the same byte with its bits in reverse order: turns the wire's MSB-first bytes
#: into the LSB-first order of ``to_int`` (bit i of the int = chunk i) and back
_REVERSED = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def set_bits(value: int) -> list[int]:
    """The positions of the set bits of a non-negative int, ascending (bit 0 first).

    Sparse values peel the lowest bit off; dense ones scan the binary string, which costs
    one C-level pass instead of one big-int operation per bit."""
    if value.bit_count() * 16 < value.bit_length():
        found = []
        while value:
            low = value & -value
            found.append(low.bit_length() - 1)
            value ^= low
        return found
    digits = bin(value)[:1:-1]  # least significant digit first, without "0b"
    found = []
    index = digits.find("1")
    while index >= 0:
        found.append(index)
        index = digits.find("1", index + 1)
    return found


class Bitmap:
    __slots__ = ("size", "_bits", "_count", "_int")

    def __init__(self, size: int, bits: bytes | None = None):
        if size < 0:
            raise ValueError(f"negative bitmap size {size}")
        self.size = size
        nbytes = (size + 7) // 8
        if bits is None:
            self._bits = bytearray(nbytes)
        else:
            if len(bits) != nbytes:
                raise ValueError(f"bitmap of {size} bits needs {nbytes} bytes, got {len(bits)}")
            if size % 8 and bits[-1] & (0xFF >> (size % 8)):
                raise ValueError("bits set beyond the end of the bitmap")
            self._bits = bytearray(bits)
        self._count = int.from_bytes(self._bits, "big").bit_count()
        #: ``to_int``, kept until the bits change: a peer's bitmap is read by every swarm
        #: it joins (the simulator hands one bitmap to hundreds of swarms)
        self._int: int | None = None

    @classmethod
    def full(cls, size: int) -> "Bitmap":
        return cls.from_int(size, (1 << size) - 1)

    @classmethod
    def from_int(cls, size: int, value: int) -> "Bitmap":
        """The bitmap whose chunk i is held when bit i of ``value`` is set (LSB first)."""
        if size < 0:
            raise ValueError(f"negative bitmap size {size}")
        if value < 0 or value >> size:
            raise ValueError("bits set beyond the end of the bitmap")
        bitmap = cls(size, value.to_bytes((size + 7) // 8, "little").translate(_REVERSED))
        bitmap._int = value
        return bitmap

    def to_int(self) -> int:
        """The held chunks as an int, bit i set when chunk i is held: the form the swarm
        core computes with (one big-int AND instead of a loop over chunks)."""
        value = self._int
        if value is None:
            value = self._int = int.from_bytes(self._bits.translate(_REVERSED), "little")
        return value

    def __contains__(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> bool:
        """Set a bit; True if it was not set before."""
        if index in self:
            return False
        self._bits[index >> 3] |= 0x80 >> (index & 7)
        self._count += 1
        self._int = None
        return True

    def discard(self, index: int) -> None:
        if index in self:
            self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF
            self._count -= 1
            self._int = None

    def __len__(self) -> int:
        """Number of chunks held."""
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def held(self) -> Iterator[int]:
        return iter(set_bits(self.to_int()))

    def missing(self) -> Iterator[int]:
        return iter(set_bits(self.to_int() ^ ((1 << self.size) - 1)))

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other) -> bool:
        return isinstance(other, Bitmap) and self.size == other.size and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap({self._count}/{self.size})"

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"chunk {index} outside bitmap of {self.size}")
