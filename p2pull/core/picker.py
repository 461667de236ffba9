"""Which chunk to ask a peer for: urgent chunks first, then the rarest, ties broken at random.

Sets of chunks are ints (bit i = chunk i), so "what this peer holds that we still want" is
one big-int AND, not a loop over chunks. ``Rarity`` keeps, incrementally, how many peers hold
each chunk and the wanted chunks bucketed by that count; ``pick`` is a pure function of a
candidate set, those buckets, the urgent set and a random generator (Kraken's
``piecerequest/policy.go`` in spirit).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort

from p2pull.core.bitmap import set_bits

#: below this many candidates, reading each one's count beats scanning the buckets
SMALL_CANDIDATE_SET = 12


def lowest_bit(mask: int) -> int:
    """The smallest index in a non-empty set."""
    return (mask & -mask).bit_length() - 1


def nth_bit(mask: int, n: int) -> int:
    """The ``n``-th smallest index in ``mask`` (0-based; ``n < mask.bit_count()``), by halving
    the int: O(log size) big-int operations."""
    offset = 0
    width = mask.bit_length()
    while width > 64:
        half = width >> 1
        low = mask & ((1 << half) - 1)
        count = low.bit_count()
        if n < count:
            mask, width = low, half
        else:
            n -= count
            mask >>= half
            offset += half
            width = mask.bit_length()
    while True:  # at most 64 bits left: peel them
        low = mask & -mask
        if n == 0:
            return offset + low.bit_length() - 1
        mask ^= low
        n -= 1


def random_bit(mask: int, rng: random.Random) -> int:
    """A uniformly random index of a non-empty set."""
    count = mask.bit_count()
    if count == 1:
        return mask.bit_length() - 1
    return nth_bit(mask, rng.randrange(count))


class Rarity:
    """Availability of each chunk among our live peers, and the wanted chunks (missing, with
    no request or origin fetch under way) bucketed by it.

    ``wanted`` and ``pickable`` (wanted and held by at least one peer) are sets as ints;
    ``wanted & ~pickable`` are the orphans only the origin can serve. All updates are O(1)
    big-int operations, except adding or removing a whole peer bitmap (O(chunks it holds))."""

    __slots__ = ("size", "avail", "buckets", "levels", "wanted", "pickable")

    def __init__(self, size: int):
        self.size = size
        #: how many live peers hold each chunk
        self.avail = [0] * size
        #: availability k >= 1 -> set of the wanted chunks held by exactly k peers
        self.buckets: dict[int, int] = {}
        #: the non-empty bucket keys, ascending
        self.levels: list[int] = []
        self.wanted = 0
        self.pickable = 0

    @property
    def orphans(self) -> int:
        """Wanted chunks no peer holds."""
        return self.wanted & ~self.pickable

    def _put(self, level: int, bit: int) -> None:
        mask = self.buckets.get(level)
        if mask:
            self.buckets[level] = mask | bit
        else:
            self.buckets[level] = bit
            insort(self.levels, level)

    def _take(self, level: int, bit: int) -> None:
        mask = self.buckets[level] & ~bit
        if mask:
            self.buckets[level] = mask
        else:
            del self.buckets[level]
            del self.levels[bisect_left(self.levels, level)]

    def want(self, index: int) -> None:
        bit = 1 << index
        if self.wanted & bit:
            return
        self.wanted |= bit
        level = self.avail[index]
        if level:
            self.pickable |= bit
            self._put(level, bit)

    def unwant(self, index: int) -> None:
        bit = 1 << index
        if not self.wanted & bit:
            return
        self.wanted ^= bit
        if self.pickable & bit:
            self.pickable ^= bit
            self._take(self.avail[index], bit)

    def inc(self, index: int) -> int:
        """One more peer holds ``index``; returns the new availability."""
        bit = 1 << index
        if self.wanted & bit:
            return self.inc_wanted(index, bit)
        level = self.avail[index] + 1
        self.avail[index] = level
        return level

    def inc_wanted(self, index: int, bit: int) -> int:
        """``inc`` of a chunk the caller knows is wanted, ``bit`` being ``1 << index``: every
        Have of a wanted chunk comes here, and Haves are most of a swarm's events, so the
        bucket moves of ``_take`` and ``_put`` are inline."""
        level = self.avail[index] + 1
        self.avail[index] = level
        buckets = self.buckets
        if level > 1:
            mask = buckets[level - 1] ^ bit  # it is in that bucket: xor clears it
            if mask:
                buckets[level - 1] = mask
            else:
                del buckets[level - 1]
                levels = self.levels
                del levels[bisect_left(levels, level - 1)]
        else:
            self.pickable |= bit
        mask = buckets.get(level)
        if mask:
            buckets[level] = mask | bit
        else:
            buckets[level] = bit
            insort(self.levels, level)
        return level

    def dec(self, index: int) -> int:
        """One peer fewer holds ``index``; returns the new availability."""
        level = self.avail[index] - 1
        if level < 0:
            raise ValueError(f"chunk {index} availability below zero")
        self.avail[index] = level
        bit = 1 << index
        if self.wanted & bit:
            self._take(level + 1, bit)
            if level:
                self._put(level, bit)
            else:
                self.pickable ^= bit
        return level

    def add_holder(self, bits: int) -> None:
        """A peer holding the chunks in ``bits`` arrived."""
        if not bits:
            return
        avail = self.avail
        for index in set_bits(bits):
            avail[index] += 1
        moving = bits & self.wanted
        if moving:
            self._shift(moving, +1)
            self.pickable |= moving

    def remove_holder(self, bits: int) -> int:
        """A peer holding ``bits`` left; returns the wanted chunks nobody holds any more."""
        if not bits:
            return 0
        avail = self.avail
        for index in set_bits(bits):
            if avail[index] <= 0:
                raise ValueError(f"chunk {index} availability below zero")
            avail[index] -= 1
        moving = bits & self.wanted
        if not moving:
            return 0
        orphaned = self._shift(moving, -1)
        self.pickable &= ~orphaned
        return orphaned

    def _shift(self, moving: int, step: int) -> int:
        """Move the wanted chunks in ``moving`` one bucket up or down, all buckets at once;
        returns those that fell to zero (step -1)."""
        buckets: dict[int, int] = {}
        orphaned = 0
        if step > 0:
            fresh = moving & ~self.pickable  # held by nobody until now
            if fresh:
                buckets[1] = fresh
        for level, mask in self.buckets.items():
            moved = mask & moving
            stay = mask ^ moved
            if stay:
                buckets[level] = buckets.get(level, 0) | stay
            if moved:
                target = level + step
                if target:
                    buckets[target] = buckets.get(target, 0) | moved
                else:
                    orphaned |= moved
        self.buckets = buckets
        self.levels = sorted(buckets)
        return orphaned


def pick(candidates: int, rarity: Rarity, urgent: int, rng: random.Random) -> int | None:
    """The chunk to request next among ``candidates`` (a subset of ``rarity.pickable``): the
    lowest urgent one (a streaming reader waits for them in order), else one of the rarest,
    chosen uniformly at random among equals. None if there are no candidates."""
    if not candidates:
        return None
    hot = candidates & urgent
    if hot:
        return lowest_bit(hot)
    if candidates.bit_count() <= SMALL_CANDIDATE_SET:
        avail = rarity.avail
        best: list[int] = []
        best_level = 0
        for index in set_bits(candidates):
            level = avail[index]
            if not best or level < best_level:
                best, best_level = [index], level
            elif level == best_level:
                best.append(index)
        return best[0] if len(best) == 1 else best[rng.randrange(len(best))]
    buckets = rarity.buckets
    for level in rarity.levels:
        mask = buckets[level] & candidates
        if mask:
            return random_bit(mask, rng)
    return None  # candidates outside the buckets: not wanted


def pick_duplicate(candidates: int, sources: list[int], urgent: int,
                   rng: random.Random) -> int | None:
    """Endgame: the in-flight chunk to ask one more peer for, among ``candidates``: urgent
    first, then the one with the fewest sources (requests and origin fetches) under way,
    random among equals."""
    if not candidates:
        return None
    hot = candidates & urgent
    if hot:
        candidates = hot
    best: list[int] = []
    fewest = 0
    for index in set_bits(candidates):
        count = sources[index]
        if not best or count < fewest:
            best, fewest = [index], count
        elif count == fewest:
            best.append(index)
    return best[0] if len(best) == 1 else best[rng.randrange(len(best))]
