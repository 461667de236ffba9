"""The bitmap of held chunks, and its wire form (most significant bit first)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pull.core.bitmap import Bitmap


def test_new_bitmap_is_empty():
    bitmap = Bitmap(10)
    assert len(bitmap) == 0
    assert not bitmap.complete
    assert list(bitmap.held()) == []
    assert list(bitmap.missing()) == list(range(10))
    assert bitmap.to_bytes() == b"\x00\x00"


def test_add_discard_contains_len():
    bitmap = Bitmap(10)
    assert bitmap.add(3) is True
    assert bitmap.add(3) is False  # already held: counted once
    assert 3 in bitmap and 4 not in bitmap
    assert len(bitmap) == 1
    bitmap.add(9)
    assert len(bitmap) == 2
    assert list(bitmap.held()) == [3, 9]
    bitmap.discard(3)
    bitmap.discard(3)  # discarding a missing bit is a no-op
    assert 3 not in bitmap
    assert len(bitmap) == 1
    assert list(bitmap.missing()) == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_complete():
    bitmap = Bitmap(3)
    for index in range(3):
        assert not bitmap.complete
        bitmap.add(index)
    assert bitmap.complete
    bitmap.discard(1)
    assert not bitmap.complete
    assert Bitmap.full(3).complete
    assert len(Bitmap.full(17)) == 17


def test_empty_bitmap():
    bitmap = Bitmap(0)
    assert bitmap.to_bytes() == b""
    assert len(bitmap) == 0
    assert Bitmap(0, b"") == bitmap


def test_msb_first_bit_order():
    bitmap = Bitmap(16)
    bitmap.add(0)
    assert bitmap.to_bytes() == b"\x80\x00"
    bitmap.add(7)
    assert bitmap.to_bytes() == b"\x81\x00"
    bitmap.add(8)
    assert bitmap.to_bytes() == b"\x81\x80"
    bitmap.add(15)
    assert bitmap.to_bytes() == b"\x81\x81"
    assert Bitmap(16, b"\x40\x00").held().__next__() == 1


def test_full_bitmap_bytes_leave_the_tail_clear():
    assert Bitmap.full(10).to_bytes() == b"\xff\xc0"
    assert Bitmap.full(8).to_bytes() == b"\xff"
    assert Bitmap.full(1).to_bytes() == b"\x80"


@pytest.mark.parametrize("index", [-1, 10, 16])
def test_out_of_range_indexes(index):
    bitmap = Bitmap(10)
    with pytest.raises(IndexError):
        bitmap.add(index)
    with pytest.raises(IndexError):
        index in bitmap  # noqa: B015
    with pytest.raises(IndexError):
        bitmap.discard(index)
    assert len(bitmap) == 0
    assert bitmap.to_bytes() == b"\x00\x00"


def test_refuses_bits_set_past_the_end():
    with pytest.raises(ValueError, match="beyond"):
        Bitmap(10, b"\x00\x20")  # bit 10
    with pytest.raises(ValueError, match="beyond"):
        Bitmap(10, b"\xff\xff")
    with pytest.raises(ValueError, match="beyond"):
        Bitmap(1, b"\x40")
    assert len(Bitmap(10, b"\x00\xc0")) == 2  # bits 8 and 9 are inside


@pytest.mark.parametrize("size, data", [(10, b"\x00"), (10, b"\x00\x00\x00"), (8, b""),
                                        (0, b"\x00"), (9, b"\xff")])
def test_refuses_wrong_byte_lengths(size, data):
    with pytest.raises(ValueError, match="bytes"):
        Bitmap(size, data)


def test_negative_size():
    with pytest.raises(ValueError):
        Bitmap(-1)


def test_from_bytes_counts_bits():
    bitmap = Bitmap(12, b"\xa5\x30")
    assert len(bitmap) == 6
    assert list(bitmap.held()) == [0, 2, 5, 7, 10, 11]


def test_from_bytes_copies_its_input():
    data = bytearray(b"\x00")
    bitmap = Bitmap(8, data)
    data[0] = 0xFF
    assert len(bitmap) == 0 and 0 not in bitmap


def test_equality():
    a, b = Bitmap(9), Bitmap(9)
    assert a == b
    a.add(8)
    assert a != b
    b.add(8)
    assert a == b
    assert Bitmap(8) != Bitmap(9)
    assert Bitmap(8) != b"\x00"


@st.composite
def sized_sets(draw):
    size = draw(st.integers(0, 300))
    held = draw(st.sets(st.integers(0, size - 1), max_size=size)) if size else set()
    return size, held


@settings(max_examples=200)
@given(sized_sets())
def test_round_trip_through_bytes(case):
    size, held = case
    bitmap = Bitmap(size)
    for index in held:
        bitmap.add(index)
    data = bitmap.to_bytes()
    assert len(data) == (size + 7) // 8
    restored = Bitmap(size, data)
    assert restored == bitmap
    assert set(restored.held()) == held
    assert len(restored) == len(held)
    assert restored.complete == (len(held) == size)
    # the wire form is the MSB-first bit string
    bits = "".join(f"{byte:08b}" for byte in data)[:size]
    assert bits == "".join("1" if i in held else "0" for i in range(size))


@settings(max_examples=50)
@given(sized_sets(), st.data())
def test_len_tracks_add_and_discard(case, data):
    size, held = case
    bitmap = Bitmap(size)
    model: set[int] = set()
    if not size:
        return
    for _ in range(30):
        index = data.draw(st.integers(0, size - 1))
        if data.draw(st.booleans()):
            assert bitmap.add(index) == (index not in model)
            model.add(index)
        else:
            bitmap.discard(index)
            model.discard(index)
        assert len(bitmap) == len(model)
        assert set(bitmap.held()) == model


@settings(max_examples=200)
@given(st.integers(0, 100).flatmap(
    lambda size: st.tuples(st.just(size), st.binary(min_size=(size + 7) // 8,
                                                    max_size=(size + 7) // 8))))
def test_any_wire_bytes_are_accepted_exactly_when_no_tail_bit_is_set(case):
    size, data = case
    tail_bits = "".join(f"{byte:08b}" for byte in data)[size:]
    if "1" in tail_bits:
        with pytest.raises(ValueError):
            Bitmap(size, data)
    else:
        bitmap = Bitmap(size, data)
        assert bitmap.to_bytes() == data
        assert len(bitmap) == "".join(f"{byte:08b}" for byte in data).count("1")


def test_to_int_follows_every_change():
    bitmap = Bitmap(20)
    assert bitmap.to_int() == 0
    bitmap.add(3)
    assert bitmap.to_int() == 1 << 3
    bitmap.add(17)
    assert bitmap.to_int() == (1 << 3) | (1 << 17)
    bitmap.discard(3)
    assert bitmap.to_int() == 1 << 17
    again = Bitmap.from_int(20, 0b101)
    assert again.to_int() == 0b101 and set(again.held()) == {0, 2}
    again.add(1)
    assert again.to_int() == 0b111
