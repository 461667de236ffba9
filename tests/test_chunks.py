"""The protocol's chunk size function and the chunk plan of a blob."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pull.core.chunks import (MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TARGET_CHUNKS_PER_BLOB,
                                ChunkPlan, chunk_size_for)

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
blob_sizes = st.one_of(st.integers(0, 4 * GiB), st.integers(0, 4 * TiB),
                       st.integers(0, 3 * MIN_CHUNK_SIZE))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_constants_are_sane():
    assert is_power_of_two(MIN_CHUNK_SIZE) and is_power_of_two(MAX_CHUNK_SIZE)
    assert MIN_CHUNK_SIZE < MAX_CHUNK_SIZE


@pytest.mark.parametrize("size, expected", [
    (0, MIN_CHUNK_SIZE),
    (1, MIN_CHUNK_SIZE),
    (TARGET_CHUNKS_PER_BLOB * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE),
    (TARGET_CHUNKS_PER_BLOB * MIN_CHUNK_SIZE + 1, 2 * MIN_CHUNK_SIZE),
    (410 * MiB, 256 * 1024),  # the lab's largest layer
    (1 * GiB, 512 * 1024),
    (1 * GiB + 1, 1 * MiB),
    (4 * GiB, 2 * MiB),
    (32 * GiB, MAX_CHUNK_SIZE),
    (32 * GiB - 1, MAX_CHUNK_SIZE),
    (16 * GiB, 8 * MiB),
    (100 * GiB, MAX_CHUNK_SIZE),
])
def test_known_sizes(size, expected):
    assert chunk_size_for(size) == expected


def test_negative_size_is_refused():
    with pytest.raises(ValueError):
        chunk_size_for(-1)


@settings(max_examples=300)
@given(blob_sizes)
def test_power_of_two_within_bounds(size):
    chunk = chunk_size_for(size)
    assert is_power_of_two(chunk)
    assert MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE


@settings(max_examples=300)
@given(blob_sizes, blob_sizes)
def test_monotone_in_blob_size(a, b):
    small, large = sorted((a, b))
    assert chunk_size_for(small) <= chunk_size_for(large)


@settings(max_examples=300)
@given(blob_sizes)
def test_about_target_chunks_until_max_caps(size):
    chunk = chunk_size_for(size)
    count = ChunkPlan.for_blob(size).count
    if chunk < MAX_CHUNK_SIZE:
        assert count <= TARGET_CHUNKS_PER_BLOB
    if MIN_CHUNK_SIZE < chunk < MAX_CHUNK_SIZE:
        # the smallest power of two that fits: half of it would need too many chunks
        assert -(-size // (chunk // 2)) > TARGET_CHUNKS_PER_BLOB
        assert count > TARGET_CHUNKS_PER_BLOB // 2
    if chunk == MAX_CHUNK_SIZE:
        assert count >= TARGET_CHUNKS_PER_BLOB // 2


def test_every_power_of_two_in_range_is_used():
    largest = 2 * MAX_CHUNK_SIZE * TARGET_CHUNKS_PER_BLOB
    seen = {chunk_size_for(n * MiB) for n in range(0, largest // MiB, 7)}
    size = MIN_CHUNK_SIZE
    while size <= MAX_CHUNK_SIZE:
        assert size in seen
        size *= 2


# -- plan ---------------------------------------------------------------------------------


def test_simple_plan():
    plan = ChunkPlan(10, 4)
    assert plan.count == 3
    assert [plan.span(i) for i in range(3)] == [(0, 4), (4, 4), (8, 2)]
    assert plan.offset(2) == 8
    assert plan.length(2) == 2


def test_exact_multiple_has_no_empty_tail():
    plan = ChunkPlan(12, 4)
    assert plan.count == 3
    assert plan.span(2) == (8, 4)


def test_empty_blob_has_one_empty_chunk():
    plan = ChunkPlan.for_blob(0)
    assert plan.count == 1
    assert plan.span(0) == (0, 0)
    with pytest.raises(IndexError):
        plan.span(1)


def test_for_blob_uses_the_protocol_function_or_the_override():
    assert ChunkPlan.for_blob(5 * GiB).chunk_size == chunk_size_for(5 * GiB)
    assert ChunkPlan.for_blob(5 * GiB, 1 * MiB).chunk_size == 1 * MiB
    assert ChunkPlan.for_blob(100 * GiB, None).chunk_size == MAX_CHUNK_SIZE


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_index_out_of_range(index):
    plan = ChunkPlan(10, 4)
    for method in (plan.offset, plan.length, plan.span):
        with pytest.raises(IndexError, match=str(index)):
            method(index)


@pytest.mark.parametrize("blob_size, chunk_size", [(-1, 4), (10, 0), (10, -4)])
def test_bad_plans(blob_size, chunk_size):
    with pytest.raises(ValueError):
        ChunkPlan(blob_size, chunk_size)


def test_plan_is_a_frozen_value():
    plan = ChunkPlan(10, 4)
    assert plan == ChunkPlan(10, 4)
    with pytest.raises(AttributeError):
        plan.chunk_size = 8  # type: ignore[misc]


@st.composite
def plans(draw):
    """Chunk sizes of any kind, blob sizes up to a few hundred chunks (loops stay short)."""
    chunk_size = draw(st.one_of(st.integers(1, 64), st.integers(1, 2**34)))
    blob_size = draw(st.integers(0, 300 * chunk_size))
    return blob_size, chunk_size


@settings(max_examples=300)
@given(plans())
def test_spans_tile_the_blob(case):
    blob_size, chunk_size = case
    plan = ChunkPlan(blob_size, chunk_size)
    position = 0
    for index in range(plan.count):
        offset, length = plan.span(index)
        assert offset == position  # no gap, no overlap
        assert 0 < length <= chunk_size or (blob_size == 0 and length == 0)
        if index < plan.count - 1:
            assert length == chunk_size  # only the last one is shorter
        position += length
    assert position == blob_size
    with pytest.raises(IndexError):
        plan.span(plan.count)
