"""Chunk choice: urgent first, then rarest first, random among equals; the incremental
availability buckets agree with a recount."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pull.core.bitmap import Bitmap, set_bits
from p2pull.core.picker import (
    Rarity, lowest_bit, nth_bit, pick, pick_duplicate, random_bit,
)


def mask(*indexes: int) -> int:
    value = 0
    for index in indexes:
        value |= 1 << index
    return value


def rarity_with(size: int, holders: list[set[int]], wanted: set[int]) -> Rarity:
    rarity = Rarity(size)
    for index in sorted(wanted):
        rarity.want(index)
    for held in holders:
        rarity.add_holder(mask(*held))
    return rarity


def check(rarity: Rarity, holders: list[int], wanted: set[int]) -> None:
    """The incremental state equals one computed from scratch."""
    counts = [sum(1 for bits in holders if bits >> index & 1) for index in range(rarity.size)]
    assert rarity.avail == counts
    assert rarity.wanted == mask(*wanted)
    assert rarity.pickable == mask(*(i for i in wanted if counts[i]))
    expected: dict[int, int] = {}
    for index in wanted:
        if counts[index]:
            expected[counts[index]] = expected.get(counts[index], 0) | 1 << index
    assert rarity.buckets == expected
    assert rarity.levels == sorted(expected)


def test_bit_helpers():
    value = mask(0, 3, 64, 65, 200, 999)
    assert set_bits(value) == [0, 3, 64, 65, 200, 999]
    assert set_bits((1 << 1000) - 1) == list(range(1000))  # the dense path
    assert set_bits(0) == []
    assert lowest_bit(value) == 0 and lowest_bit(mask(77)) == 77
    assert [nth_bit(value, n) for n in range(6)] == [0, 3, 64, 65, 200, 999]


@settings(max_examples=200)
@given(st.sets(st.integers(0, 3000), min_size=1, max_size=200))
def test_nth_bit_matches_sorted_list(indexes):
    value = mask(*indexes)
    ordered = sorted(indexes)
    assert set_bits(value) == ordered
    for n in range(0, len(ordered), max(1, len(ordered) // 7)):
        assert nth_bit(value, n) == ordered[n]


def test_random_bit_is_uniform():
    rng = random.Random(5)
    value = mask(1, 2, 3, 500, 900)  # clustered and sparse bits alike
    counts = Counter(random_bit(value, rng) for _ in range(10000))
    assert set(counts) == {1, 2, 3, 500, 900}
    assert all(1700 < count < 2300 for count in counts.values()), counts


def test_rarest_first():
    # chunk 0 held by 3 peers, chunk 1 by 1, chunk 2 by 2
    rarity = rarity_with(4, [{0, 1, 2}, {0, 2}, {0}], wanted={0, 1, 2, 3})
    rng = random.Random(1)
    assert pick(mask(0, 1, 2), rarity, 0, rng) == 1
    assert pick(mask(0, 2), rarity, 0, rng) == 2
    assert pick(mask(0), rarity, 0, rng) == 0
    assert pick(0, rarity, 0, rng) is None


def test_urgent_beats_rarity_and_goes_in_order():
    rarity = rarity_with(10, [{1, 5, 7, 9}, {5, 7, 9}], wanted=set(range(10)))
    rng = random.Random(1)
    assert pick(mask(1, 5, 7, 9), rarity, mask(9, 7), rng) == 7
    assert pick(mask(1, 9), rarity, mask(9, 7), rng) == 9
    assert pick(mask(1, 5), rarity, mask(9, 7), rng) == 1  # no urgent candidate


def test_ties_are_random_but_seeded():
    size = 200
    rarity = rarity_with(size, [set(range(size))], wanted=set(range(size)))
    everything = (1 << size) - 1
    picks = [pick(everything, rarity, 0, random.Random(seed)) for seed in range(50)]
    assert len(set(picks)) > 30  # spread, so peers do not all fetch the same chunk
    assert picks == [pick(everything, rarity, 0, random.Random(seed)) for seed in range(50)]


def test_large_candidate_sets_use_the_buckets():
    size = 1000
    holders = [set(range(size)), set(range(0, size, 2)), {10, 20, 30}]
    rarity = rarity_with(size, holders, wanted=set(range(size)))
    rng = random.Random(3)
    everything = (1 << size) - 1
    # the odd chunks have one holder: the rarest
    assert all(pick(everything, rarity, 0, rng) % 2 == 1 for _ in range(100))
    evens = mask(*range(0, size, 2))
    assert all(pick(evens, rarity, 0, rng) not in (10, 20, 30) for _ in range(100))
    assert pick(mask(10, 20, 30), rarity, 0, rng) in (10, 20, 30)


def test_only_wanted_chunks_are_pickable():
    rarity = rarity_with(6, [{0, 1, 2, 3}], wanted={1, 3, 5})
    assert rarity.pickable == mask(1, 3)
    assert rarity.orphans == mask(5)
    rarity.unwant(1)
    assert rarity.pickable == mask(3)
    rarity.want(0)
    assert rarity.pickable == mask(0, 3)


def test_remove_holder_reports_new_orphans():
    rarity = rarity_with(4, [{0, 1}, {1}], wanted={0, 1, 2})
    assert rarity.remove_holder(mask(0, 1)) == mask(0)
    assert rarity.orphans == mask(0, 2)
    assert rarity.avail == [0, 1, 0, 0]


def test_pick_duplicate_prefers_fewest_sources():
    sources = [0, 2, 1, 3, 1]
    rng = random.Random(0)
    assert pick_duplicate(mask(1, 2, 3), sources, 0, rng) == 2
    assert pick_duplicate(mask(1, 3), sources, mask(3), rng) == 3
    assert {pick_duplicate(mask(2, 4), sources, 0, random.Random(s)) for s in range(20)} == \
        {2, 4}
    assert pick_duplicate(0, sources, 0, rng) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 80), st.data())
def test_incremental_buckets_match_a_recount(size, data):
    rarity = Rarity(size)
    holders: list[int] = []
    wanted: set[int] = set()
    index_strategy = st.integers(0, size - 1)
    for _ in range(40):
        op = data.draw(st.sampled_from(["want", "unwant", "inc", "dec", "join", "leave"]))
        if op == "want":
            index = data.draw(index_strategy)
            rarity.want(index)
            wanted.add(index)
        elif op == "unwant":
            index = data.draw(index_strategy)
            rarity.unwant(index)
            wanted.discard(index)
        elif op == "inc":  # a Have: one holder gains a chunk
            index = data.draw(index_strategy)
            holder = next((n for n, bits in enumerate(holders) if not bits >> index & 1),
                          None)
            if holder is None:
                holders.append(0)
                holder = len(holders) - 1
            holders[holder] |= 1 << index
            if index in wanted and data.draw(st.booleans()):  # the swarm's Have path
                assert rarity.inc_wanted(index, 1 << index) == rarity.avail[index]
            else:
                assert rarity.inc(index) == rarity.avail[index]
        elif op == "dec":
            index = data.draw(index_strategy)
            holder = next((n for n, bits in enumerate(holders) if bits >> index & 1), None)
            if holder is None:
                continue
            holders[holder] &= ~(1 << index)
            rarity.dec(index)
        elif op == "join":
            bits = data.draw(st.integers(0, (1 << size) - 1))
            holders.append(bits)
            rarity.add_holder(bits)
        elif op == "leave" and holders:
            bits = holders.pop(data.draw(st.integers(0, len(holders) - 1)))
            before = rarity.orphans
            orphaned = rarity.remove_holder(bits)
            assert orphaned == rarity.orphans & ~before
        check(rarity, holders, wanted)
        candidates = rarity.pickable & data.draw(st.integers(0, (1 << size) - 1))
        chosen = pick(candidates, rarity, 0, random.Random(0))
        if candidates:
            assert candidates >> chosen & 1
            assert rarity.avail[chosen] == min(rarity.avail[i] for i in set_bits(candidates))
        else:
            assert chosen is None


def test_bitmap_int_round_trip():
    bitmap = Bitmap(12, b"\xa5\x30")
    assert set_bits(bitmap.to_int()) == [0, 2, 5, 7, 10, 11]
    assert Bitmap.from_int(12, bitmap.to_int()) == bitmap
    assert Bitmap.full(13).to_int() == (1 << 13) - 1
    assert list(Bitmap(12, b"\xa5\x30").missing()) == [1, 3, 4, 6, 8, 9]
