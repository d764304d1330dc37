"""The demo summary reports this run's drops, not what earlier runs left in the same spool file."""

from __future__ import annotations

import orjson

from wildfire.config import SourceConfig, SpoolConfig
from wildfire.demo.run import spool_drops, this_run
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager


def overflow(spool: BufferManager, keys: list[str]) -> None:
    spool.put_batch(EncodedBatch("iot", keys, [Priority.NORMAL] * len(keys), [orjson.dumps(k) for k in keys]))


def test_drops_of_earlier_runs_are_subtracted(tmp_path):
    path = tmp_path / "spool.db"
    assert spool_drops(path) == {}  # no file yet: nothing, no error
    spool = BufferManager(SpoolConfig(capacity_per_source=2, archive_expired_path=None),
                          {"iot": SourceConfig(source_type="iot_mqtt", topic="t", priority=6)}, path=path)
    overflow(spool, ["a", "b", "c"])          # an earlier run: 1 dropped
    before = spool_drops(path)
    assert before == {"overflow/spool": 1}
    overflow(spool, ["d", "e", "f", "g"])     # this run: 4 more
    status = {"overflow/spool": 5, "backpressure/LOW": 3}  # the worker's status: cumulative spool, per-run shed
    assert spool_drops(path) == {"overflow/spool": 5}
    assert this_run(status, before) == {"overflow/spool": 4, "backpressure/LOW": 3}
    assert this_run({"overflow/spool": 1}, before) == {}
