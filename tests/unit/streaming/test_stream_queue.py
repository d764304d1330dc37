"""QueueManager: order, overflow strategies, batching, anti-starvation, block with deadline, metrics."""

from __future__ import annotations

import asyncio

import pytest

from wildfire.clock import ManualClock, SystemClock
from wildfire.config import QueueConfig
from wildfire.priority import Priority
from wildfire.streaming.metrics import StreamMetrics
from wildfire.streaming.queue import PutResult, QueueFullError, QueueInputError, QueueManager

C, H, N, L = Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW


def make(clock=None, **overrides):
    clock = clock or ManualClock()
    metrics = StreamMetrics()
    return QueueManager(QueueConfig(**overrides), clock=clock, metrics=metrics), clock, metrics


def items(batch):
    return [q.item for q in batch]


def test_batch_is_most_urgent_first_and_fifo_within_a_priority():
    q, _, _ = make()
    q.put("l1", L, source="era5")
    q.put_many(["n1", "n2"], N, source="purpleair")
    q.put("c1", C, source="nws_alerts")
    q.put_many(["h1", "h2"], H, source="nasa_firms")
    q.put("c2", "critical", source="nws_alerts")
    batch = q.get_batch()
    assert items(batch) == ["c1", "c2", "h1", "h2", "n1", "n2", "l1"]
    assert batch[0].priority is C and batch[0].source == "nws_alerts"
    assert q.depth() == 0 and q.get_batch() == []


def test_batch_size_500_and_max_items():
    q, _, _ = make()
    q.put_many(list(range(1_200)), N, source="s")
    assert len(q.get_batch()) == 500
    assert items(q.get_batch(3)) == [500, 501, 502]
    assert len(q.get_batch()) == 500 and len(q.get_batch()) == 197
    assert q.get_batch_items() == []


def test_low_share_is_5_per_100_while_low_waits():
    q, _, _ = make(max_size=100_000)
    q.put_many(list(range(1_000)), H, source="nasa_firms")
    q.put_many([f"l{i}" for i in range(100)], L, source="era5")
    batch = q.get_batch(100)
    assert [b.priority for b in batch].count(L) == 5
    assert items(batch)[-5:] == ["l0", "l1", "l2", "l3", "l4"]
    assert len(q.get_batch(500)) == 500 and q.depth(L) == 95 - 25


def test_a_record_waiting_over_an_hour_is_served_one_level_up():
    q, clock, metrics = make(max_size=100_000, low_share_per_batch=0.0)
    q.put_many([f"old{i}" for i in range(3)], L, source="era5")
    clock.advance(3_600)
    q.put("fresh-low", L, source="era5")
    q.put_many([f"n{i}" for i in range(10)], N, source="purpleair")
    batch = q.get_batch(12)
    # NORMAL first, then the aged LOW records served as NORMAL; the fresh LOW waits
    assert items(batch) == [f"n{i}" for i in range(10)] + ["old0", "old1"]
    assert batch[-1].priority is L  # promotion serves it earlier; its recorded priority is unchanged
    assert q.stats().by_priority[L].promoted == 2
    assert q.stats().by_priority[L].wait_max_s == 3_600
    assert metrics.value("wildfire_queue_promoted_total", priority="LOW") == 2


def test_drop_lowest_evicts_oldest_of_lowest_and_never_critical_while_lower_held():
    q, _, metrics = make(max_size=4)
    q.put_many(["l1", "l2"], L, source="era5")
    q.put("n1", N, source="purpleair")
    q.put("c1", C, source="nws_alerts")
    assert q.put("c2", C, source="nws_alerts") == PutResult(accepted=1, evicted=1)
    assert q.put("h1", H, source="nasa_firms") == PutResult(accepted=1, evicted=1)  # l2 goes
    assert q.put("n2", N, source="purpleair") == PutResult(accepted=1, evicted=1)  # n1 (oldest NORMAL)
    # everything held is more urgent than LOW: the incoming LOW record is the one dropped
    assert q.put("l3", L, source="era5") == PutResult(accepted=0, dropped=1)
    assert items(q.get_batch()) == ["c1", "c2", "h1", "n2"]
    st = q.stats()
    assert st.dropped_by == {("era5", L, "queue_overflow"): 3, ("purpleair", N, "queue_overflow"): 1}
    assert metrics.value("wildfire_records_dropped_total", source="era5", priority="LOW",
                         reason="queue_overflow") == 3


def test_drop_lowest_drops_oldest_critical_only_when_all_held_are_critical():
    q, _, _ = make(max_size=2)
    q.put_many(["c1", "c2"], C, source="a")
    assert q.put("h", H, source="b") == PutResult(accepted=0, dropped=1)
    assert q.put("c3", C, source="a") == PutResult(accepted=1, evicted=1)
    assert items(q.get_batch()) == ["c2", "c3"]


def test_drop_oldest_evicts_the_oldest_non_critical():
    q, clock, _ = make(max_size=3, overflow_strategy="drop_oldest")
    q.put("c1", C, source="a")
    clock.advance(1)
    q.put("h1", H, source="a")
    clock.advance(1)
    q.put("l1", L, source="a")
    clock.advance(1)
    assert q.put("n1", N, source="a").evicted == 1  # h1 is the oldest non-critical
    assert items(q.get_batch()) == ["c1", "n1", "l1"]


def test_block_hands_back_the_surplus_without_dropping():
    q, _, _ = make(max_size=3, overflow_strategy="block")
    assert q.put_many([1, 2, 3, 4, 5], N, source="s") == PutResult(accepted=3, rejected=2)
    assert q.stats().rejected == 2 and q.stats().dropped_by == {}
    assert items(q.get_batch()) == [1, 2, 3]


def test_put_wait_blocks_until_a_batch_makes_room():
    async def scenario():
        q, _, _ = make(SystemClock(), max_size=2, overflow_strategy="block")
        q.put_many(["a", "b"], N, source="s")
        task = asyncio.create_task(q.put_wait("c", C, source="nws_alerts", timeout=30))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()  # full: still waiting
        assert items(q.get_batch(1)) == ["a"]
        assert await task == PutResult(accepted=1)
        return items(q.get_batch())

    assert asyncio.run(scenario()) == ["c", "b"]


def test_put_wait_raises_a_retriable_error_at_its_deadline():
    async def scenario():
        q, clock, _ = make(max_size=1, overflow_strategy="block")
        q.put("a", N, source="s")
        with pytest.raises(QueueFullError, match=r"queue full \(1/1\) for 30 s") as err:
            await q.put_wait("b", N, source="s", timeout=30)
        assert err.value.retriable is True
        return clock.monotonic()

    assert asyncio.run(scenario()) == 30  # the injected clock moved; nothing slept


def test_get_batch_wait_three_triggers():
    async def scenario():
        q, clock, _ = make()
        assert await q.get_batch_wait() == []  # empty: waited the 5 s timeout
        assert clock.monotonic() == 5
        q.put_many(list(range(700)), N, source="s")
        assert len(await q.get_batch_wait()) == 500  # full batch at once
        assert len(await q.get_batch_wait()) == 200  # remainder flushed: queue empty after it
        assert clock.monotonic() == 5

        waiter = asyncio.create_task(q.get_batch_wait())
        await asyncio.sleep(0)
        q.put("first", C, source="nws_alerts")
        return items(await waiter)

    assert asyncio.run(scenario()) == ["first"]


def test_resize_evicts_lowest_first_and_block_keeps_everything():
    q, _, metrics = make(max_size=10)
    q.put_many(list(range(5)), C, source="a")
    q.put_many(list(range(5)), L, source="b")
    assert q.resize(6) == 4 and q.depth(L) == 1 and q.depth(C) == 5
    assert q.stats().dropped_by == {("b", L, "queue_resize"): 4}
    assert metrics.value("wildfire_queue_capacity") == 6
    qb, _, _ = make(max_size=10, overflow_strategy="block")
    qb.put_many(list(range(10)), N, source="a")
    assert qb.resize(5) == 0 and qb.fill_ratio() == 2.0
    assert qb.put("x", C, source="a").rejected == 1


def test_metrics_depth_enqueued_dequeued_wait():
    q, clock, metrics = make()
    q.put_many(list(range(10)), H, source="nasa_firms")
    clock.advance(2)
    q.get_batch(4)
    assert metrics.value("wildfire_queue_depth", priority="HIGH") == 6
    assert metrics.value("wildfire_queue_enqueued_total", source="nasa_firms", priority="HIGH") == 10
    assert metrics.value("wildfire_queue_dequeued_total", source="nasa_firms", priority="HIGH") == 4
    assert metrics.value("wildfire_queue_wait_seconds_count", priority="HIGH") == 4
    assert metrics.value("wildfire_queue_wait_seconds_sum", priority="HIGH") == 8
    assert metrics.value("wildfire_queue_wait_seconds_bucket", priority="HIGH", le="1.0") == 0
    assert metrics.value("wildfire_queue_wait_seconds_bucket", priority="HIGH", le="5.0") == 4
    st = q.stats().by_priority[H]
    assert (st.depth, st.enqueued, st.dequeued, st.wait_mean_s) == (6, 10, 4, 2.0)


@pytest.mark.parametrize("bad", ["URGENT", 9, None, -1])
def test_unknown_priority_is_a_clear_error(bad):
    q, _, _ = make()
    with pytest.raises(QueueInputError, match="unknown priority.*expected one of CRITICAL, HIGH, NORMAL, LOW"):
        q.put("x", bad, source="s")
    assert q.depth() == 0


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_bad_capacity_and_batch_size_are_clear_errors(bad):
    q, _, _ = make()
    with pytest.raises(QueueInputError, match="max_size must be a positive integer"):
        q.resize(bad)
    with pytest.raises(QueueInputError, match="max_items must be a positive integer"):
        q.get_batch(bad)


def test_negative_capacity_in_config_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_size"):
        QueueConfig(max_size=-5)
