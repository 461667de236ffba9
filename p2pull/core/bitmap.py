"""Which chunks of a blob a node holds: one bit per chunk, most significant bit first (the
order peers exchange on the wire)."""

from __future__ import annotations

from typing import Iterator


class Bitmap:
    __slots__ = ("size", "_bits", "_count")

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
        self._count = sum(bin(byte).count("1") for byte in self._bits)

    @classmethod
    def full(cls, size: int) -> "Bitmap":
        bitmap = cls(size)
        for index in range(size):
            bitmap.add(index)
        return bitmap

    def __contains__(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> bool:
        """Set a bit; True if it was not set before."""
        if index in self:
            return False
        self._bits[index >> 3] |= 0x80 >> (index & 7)
        self._count += 1
        return True

    def discard(self, index: int) -> None:
        if index in self:
            self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF
            self._count -= 1

    def __len__(self) -> int:
        """Number of chunks held."""
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def held(self) -> Iterator[int]:
        return (index for index in range(self.size) if index in self)

    def missing(self) -> Iterator[int]:
        return (index for index in range(self.size) if index not in self)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other) -> bool:
        return isinstance(other, Bitmap) and self.size == other.size and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap({self._count}/{self.size})"

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"chunk {index} outside bitmap of {self.size}")
