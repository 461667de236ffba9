"""The request book: pipeline limits, expiry, scores, bans."""

from __future__ import annotations

import pytest

from p2pull.core.book import TIMEOUT_RATE_FACTOR, RequestBook

MIB = 1024 * 1024


def book(**kwargs) -> RequestBook:
    return RequestBook(**{"pipeline_depth": 2, "timeout_min": 5.0,
                          "assumed_throughput": MIB, **kwargs})


def test_add_and_lookups():
    b = book()
    request = b.add("p", 3, 10.0, MIB)
    assert request.sent_at == 10.0
    assert b.has("p", 3) and not b.has("p", 4) and not b.has("q", 3)
    assert b.get("p", 3) is request
    assert b.outstanding("p") == 1 and b.outstanding("q") == 0
    b.add("q", 3, 10.0, MIB)
    assert b.peers_for(3) == ["p", "q"]
    assert b.sources(3) == 2 and b.sources(4) == 0
    assert b.requests_of("p") == [3]
    assert len(b) == 2


def test_pipeline_limit():
    b = book()
    b.add("p", 0, 0.0, 1)
    assert b.has_capacity("p")
    b.add("p", 1, 0.0, 1)
    assert not b.has_capacity("p")
    with pytest.raises(ValueError, match="full"):
        b.add("p", 2, 0.0, 1)
    with pytest.raises(ValueError, match="already"):
        b.add("p", 1, 0.0, 1)
    b.cancel("p", 0)
    assert b.has_capacity("p")


def test_timeout_from_measured_throughput():
    b = book(pipeline_depth=4)
    # unmeasured: assumed 1 MiB/s -> 4 x 8 MiB / 1 MiB/s = 32 s, above the 5 s floor
    assert b.timeout("p", 8 * MIB) == pytest.approx(TIMEOUT_RATE_FACTOR * 8)
    assert b.timeout("p", 1024) == 5.0  # small chunk: the floor
    b.add("p", 0, 0.0, 8 * MIB)
    b.complete("p", 0, 8 * MIB, 0.5)  # 16 MiB/s measured
    assert b.throughput("p") == pytest.approx(16 * MIB)
    assert b.timeout("p", 8 * MIB) == 5.0
    assert b.timeout("p", 64 * MIB) == pytest.approx(16.0)
    request = b.add("p", 1, 100.0, 64 * MIB)
    assert request.expires_at == pytest.approx(116.0)


def test_ewma():
    b = book(smoothing=0.5)
    b.add("p", 0, 0.0, 100)
    b.complete("p", 0, 100, 1.0)
    b.add("p", 1, 1.0, 300)
    b.complete("p", 1, 300, 2.0)
    assert b.throughput("p") == pytest.approx(200.0)


def test_expiry_in_order_and_lazy_deletion():
    b = book(pipeline_depth=8, timeout_min=5.0)
    b.add("p", 0, 0.0, 1)
    b.add("p", 1, 1.0, 1)
    b.add("q", 2, 2.0, 1)
    b.complete("p", 1, 1, 1.5)  # answered: never expires
    assert b.expired(4.9) == []
    assert b.next_expiry() == 5.0
    found = b.expired(7.0)
    assert [(r.peer, r.index) for r in found] == [("p", 0), ("q", 2)]
    assert len(b) == 0
    assert b.failures("p") == 1 and b.failures("q") == 1
    assert b.next_expiry() is None
    assert b.expired(100.0) == []


def test_a_request_sent_again_gets_a_fresh_expiry():
    b = book()
    b.add("p", 0, 0.0, 1)
    b.cancel("p", 0)
    b.add("p", 0, 4.0, 1)
    assert b.expired(6.0) == []  # the old entry is stale
    assert [r.sent_at for r in b.expired(9.0)] == [4.0]


def test_scores():
    b = book()
    assert b.score("new") == MIB  # optimistic: the assumed throughput
    b.add("fast", 0, 0.0, 10 * MIB)
    b.complete("fast", 0, 10 * MIB, 1.0)
    b.add("slow", 0, 0.0, MIB)
    b.complete("slow", 0, MIB, 2.0)
    assert b.score("fast") > b.score("new") > b.score("slow")
    b.add("fast", 1, 1.0, MIB)
    b.fail("fast", 1)
    b.add("fast", 2, 1.0, MIB)
    b.fail("fast", 2)
    assert b.score("fast") == pytest.approx(10 * MIB / 3)
    assert b.failures("fast") == 2
    b.add("fast", 3, 1.0, 10 * MIB)
    b.complete("fast", 3, 10 * MIB, 2.0)  # a success halves the penalty
    assert b.score("fast") == pytest.approx(10 * MIB / 2)


def test_bans_are_for_good():
    b = book()
    b.add("p", 0, 0.0, 1)
    b.add("p", 1, 0.0, 1)
    assert b.ban("p", "corrupt") is True
    assert b.ban("p", "corrupt") is False  # once
    assert b.is_banned("p") and not b.has_capacity("p")
    assert b.outstanding("p") == 0 and b.peers_for(0) == []
    assert b.banned == {"p": "corrupt"}
    assert b.score("p") < 0
    with pytest.raises(ValueError, match="banned"):
        b.add("p", 2, 0.0, 1)


def test_drop_peer_returns_its_requests_without_blame():
    b = book(pipeline_depth=4)
    for index in (5, 1, 3):
        b.add("p", index, float(index), 1)
    b.add("q", 1, 0.0, 1)
    assert [r.index for r in b.drop_peer("p")] == [5, 1, 3]
    assert b.failures("p") == 0
    assert b.peers_for(1) == ["q"]
    assert b.drop_peer("p") == []
    assert b.expired(100.0)[0].peer == "q"


def test_unknown_closes_are_harmless():
    b = book()
    assert b.cancel("p", 0) is None
    assert b.fail("p", 0) is None
    assert b.failures("p") == 1
    assert b.complete("p", 0, 10, 1.0) is None
    assert b.throughput("p") is None  # nothing to time it against
    assert b.stats("p").successes == 1 and b.stats("nobody") is None


def test_bad_parameters():
    with pytest.raises(ValueError):
        RequestBook(pipeline_depth=0)
    with pytest.raises(ValueError):
        RequestBook(assumed_throughput=0)


def test_a_request_queued_behind_ours_at_a_busy_peer_does_not_expire():
    """Its time runs from the piece before it (fails if every request's time ran from its
    sending: request 2 would expire at 5.0 and the chunk be fetched twice)."""
    b = book(pipeline_depth=4, timeout_min=5.0)
    for index in range(3):
        b.add("p", index, 0.0, 1)
    b.complete("p", 0, 1, 4.0)
    b.complete("p", 1, 1, 8.0)
    assert b.expired(12.9) == []
    assert [r.index for r in b.expired(13.1)] == [2]  # 8.0 + 5.0: the peer stopped
    assert b.failures("p") == 1


def test_a_silent_peer_lets_each_request_expire_one_time_after_its_sending():
    """Not one time after the request before it expired: a peer that sends nothing is
    not serving the one before either."""
    b = book(pipeline_depth=4, timeout_min=5.0)
    b.add("p", 0, 0.0, 1)
    b.add("p", 1, 1.0, 1)
    assert b.expired(4.9) == []
    assert [r.index for r in b.expired(5.9)] == [0]
    assert [r.index for r in b.expired(6.0)] == [1]


def test_throughput_is_measured_from_the_previous_piece():
    """The second piece waited behind the first: its sample is its own second, not two."""
    b = book(pipeline_depth=4)
    b.add("p", 0, 0.0, MIB)
    b.add("p", 1, 0.0, MIB)
    b.complete("p", 0, MIB, 1.0)
    b.complete("p", 1, MIB, 2.0)
    assert b.throughput("p") == pytest.approx(MIB)
