"""Admission at the shipped configuration: exact threshold probes and measured reject rates.

The thresholds and rates come from ``config/stream_config.yaml`` (read the way the product reads it), so a
change of a shipped value that the guide's table (0 / 50 / 90 / 100 % of non-protected records rejected at
< 70 / >= 70 / >= 90 / >= 100 % fill) no longer matches fails here. Each probe uses a fresh manager: the
state machine steps down with hysteresis, so a probe must not inherit the previous probe's state.

The end-to-end chain (real SQLite spool filled to an exact record count -> ``Ingestor.accept`` ->
``observe`` -> ``admit_many`` -> shed keys) is measured too: the keys admission reports as not accepted
are exactly the offered keys missing from the spool.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from pathlib import Path

import pytest

from wildfire.clock import ManualClock
from wildfire.config import DEFAULT_CONFIG_PATH, StreamConfig, build_config, read_yaml
from wildfire.ingest import Ingestor
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
from wildfire.streaming.backpressure import BackpressureManager, BackpressureState

S = BackpressureState
JANUARY = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC).timestamp()  # outside the shipped fire season
JULY = dt.datetime(2026, 7, 15, 10, 0, tzinfo=dt.UTC).timestamp()  # inside it (mode auto, months 6-10)


def shipped() -> StreamConfig:
    return build_config(read_yaml(DEFAULT_CONFIG_PATH))


def manager(wall: float = JANUARY, seed: int = 0) -> BackpressureManager:
    return BackpressureManager(shipped().backpressure, clock=ManualClock(wall_start=wall), rng=random.Random(seed))


# (fill, state) around each shipped threshold, out of season and in fire season.
PROBES = [(0.0, S.NORMAL), (0.6999, S.NORMAL), (0.70, S.WARNING), (0.8999, S.WARNING), (0.90, S.CRITICAL),
          (0.9999, S.CRITICAL), (1.0, S.LOAD_SHEDDING), (1.5, S.LOAD_SHEDDING)]
FIRE_SEASON_PROBES = [(0.7999, S.NORMAL), (0.80, S.WARNING), (0.9499, S.WARNING), (0.95, S.CRITICAL),
                      (0.9999, S.CRITICAL), (1.0, S.LOAD_SHEDDING)]


@pytest.mark.parametrize(("fill", "state"), PROBES)
def test_shipped_thresholds_are_exact(fill: float, state: BackpressureState) -> None:
    assert manager().observe(fill) is state


@pytest.mark.parametrize(("fill", "state"), FIRE_SEASON_PROBES)
def test_shipped_fire_season_thresholds_are_exact(fill: float, state: BackpressureState) -> None:
    assert manager(wall=JULY).observe(fill) is state


# The guide's table (slide 31): share of non-protected records rejected per state.
GUIDE_REJECT = {S.NORMAL: 0.0, S.WARNING: 0.5, S.CRITICAL: 0.9, S.LOAD_SHEDDING: 1.0}
FILL_FOR = {S.NORMAL: 0.0, S.WARNING: 0.70, S.CRITICAL: 0.90, S.LOAD_SHEDDING: 1.0}
SEEDS = range(20)
DRAWS = 5_000
# Binomial sd of one seed's fraction at p = 0.5 is sqrt(0.25 / 5000) = 0.0071: the per-seed tolerance
# 0.03 is > 4 sd, the pooled one (100,000 draws, sd 0.0016) 0.006 is > 3.7 sd. Seeded, so not flaky.
PER_SEED_TOL = 0.03
POOLED_TOL = 0.006


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("priority", [Priority.NORMAL, Priority.LOW])
def test_measured_reject_rate_matches_the_guide(state: BackpressureState, priority: Priority) -> None:
    rejected = 0
    for seed in SEEDS:
        bp = manager(seed=seed)
        assert bp.observe(FILL_FOR[state]) is state
        admitted = bp.admit_many(DRAWS, priority, "nws_observations")
        frac = (DRAWS - admitted) / DRAWS
        assert abs(frac - GUIDE_REJECT[state]) <= PER_SEED_TOL, (state, priority, seed, frac)
        rejected += DRAWS - admitted
    pooled = rejected / (DRAWS * len(SEEDS))
    assert abs(pooled - GUIDE_REJECT[state]) <= POOLED_TOL, (state, priority, pooled)
    if GUIDE_REJECT[state] in (0.0, 1.0):
        assert pooled == GUIDE_REJECT[state]  # no draw at all in these states: exact


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("priority", [Priority.CRITICAL, Priority.HIGH])
def test_protected_priorities_are_never_rejected_at_the_shipped_setting(state: BackpressureState,
                                                                        priority: Priority) -> None:
    bp = manager(seed=3)
    bp.observe(FILL_FOR[state])
    assert bp.admit_many(DRAWS, priority, "nasa_firms") == DRAWS
    assert sum(bp.admit(priority, source="nasa_firms").admitted for _ in range(200)) == 200


# ---------------------------------------------------------------- the chain with a real spool


def _batch(source: str, prio: Priority, n: int, tag: str) -> EncodedBatch:
    keys = [f"{tag}-{i}" for i in range(n)]
    return EncodedBatch(source, keys, [prio] * n, [b'{"k": %d}' % i for i in range(n)])


def _spooled_keys(cfg: StreamConfig) -> set[str]:
    # Read through a read-only spool (records live in chunks, several per SQLite row).
    spool = BufferManager.open_read_only(cfg.spool, cfg.sources)
    try:
        return {r.key for r in spool.peek_batch(10**7)}
    finally:
        spool.close()


@pytest.mark.parametrize(("held", "state", "expect"), [
    (6_999, S.NORMAL, 0.0), (7_000, S.WARNING, 0.5), (8_999, S.WARNING, 0.5), (9_000, S.CRITICAL, 0.9),
    (9_999, S.CRITICAL, 0.9), (10_000, S.LOAD_SHEDDING, 1.0)])
def test_spool_fill_drives_shedding_by_key(tmp_path: Path, held: int, state: BackpressureState,
                                           expect: float) -> None:
    """Spool at ``held`` of its shipped 10,000 -> accept 2,000 NORMAL + 100 HIGH + 50 CRITICAL."""
    cfg = build_config(read_yaml(DEFAULT_CONFIG_PATH), {"spool": {"path": str(tmp_path / "spool.db"),
                                                                  "archive_expired_path": str(tmp_path / "x.jsonl")}})
    assert cfg.spool.capacity_per_source == 10_000
    clock = ManualClock(wall_start=JANUARY)
    spool = BufferManager(cfg.spool, cfg.sources, clock=clock)
    try:
        ing = Ingestor(spool, cfg, clock=clock, rng=random.Random(held))
        spool.put_batch(_batch("nws_observations", Priority.LOW, held, "pre"))
        assert ing.fill("nws_observations") == held / 10_000
        offered = {Priority.NORMAL: 2_000, Priority.HIGH: 100, Priority.CRITICAL: 50}
        keys: list[str] = []
        prios: list[Priority] = []
        for p, n in offered.items():
            keys += [f"{p.name}-{i}" for i in range(n)]
            prios += [p] * n
        rep = ing.accept("nws_observations", EncodedBatch("nws_observations", keys, prios,
                                                          [b"{}"] * len(keys)))
        assert rep.backpressure_state == state.name
        shed = set(rep.not_accepted)
        assert len(shed) == len(rep.not_accepted)  # each key reported once
        # Only NORMAL keys are shed, never HIGH or CRITICAL.
        assert {k.split("-")[0] for k in shed} <= {"NORMAL"}
        frac = len(shed) / offered[Priority.NORMAL]
        assert abs(frac - expect) <= 0.05, (held, frac)  # 2,000 draws: sd <= 0.012 at p = 0.5
        # By key: every offered key is either shed or in the spool, never both, never neither.
        in_spool = _spooled_keys(cfg) & set(keys)
        assert in_spool.isdisjoint(shed)
        # Overflow at 10,000 evicts the lowest (pre-filled LOW rows), not the offered ones.
        assert in_spool | shed == set(keys)
        assert rep.shed.get("NORMAL", 0) == len(shed)
        # The pre-filled LOW rows the overflow evicted are named, with their reason, in dropped_ids.
        gone_pre = {f"pre-{i}" for i in range(held)} - _spooled_keys(cfg)
        assert _dropped_keys(cfg.spool.path) == {k: "overflow" for k in gone_pre}
        assert len(gone_pre) == max(0, held + len(keys) - len(shed) - 10_000)
    finally:
        spool.close()


def _dropped_keys(path: str) -> dict[str, str]:
    con = sqlite3.connect(path)
    try:
        return dict(con.execute("SELECT key, reason FROM dropped_ids"))
    finally:
        con.close()


def test_a_store_without_dropped_keys_gets_the_column_at_open(tmp_path: Path) -> None:
    """A spool written before ``dropped_ids.key`` existed opens, and its evictions are then named."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE dropped_ids (id INTEGER PRIMARY KEY, source TEXT NOT NULL, priority INTEGER NOT NULL,"
                " reason TEXT NOT NULL, at REAL NOT NULL)")
    con.execute("INSERT INTO dropped_ids VALUES (1, 'iot_mqtt', 2, 'overflow', ?)", (JANUARY,))
    con.commit()
    con.close()
    cfg = build_config(read_yaml(DEFAULT_CONFIG_PATH), {"spool": {"path": str(path), "capacity_per_source": 5}})
    spool = BufferManager(cfg.spool, cfg.sources, clock=ManualClock(wall_start=JANUARY))
    try:
        spool.put_batch(_batch("iot_mqtt", Priority.NORMAL, 8, "k"))
        assert _dropped_keys(str(path)) == {None: "overflow", "k-0": "overflow", "k-1": "overflow",
                                            "k-2": "overflow"}
    finally:
        spool.close()
