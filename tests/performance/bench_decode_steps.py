"""Micro-benchmark, per step: the storage consumer's decode (``wildfire.storage.rows``) beside a baseline commit's.

    .venv/bin/python tests/performance/bench_decode_steps.py                 # 5,000-record batches, 7 rounds
    .venv/bin/python tests/performance/bench_decode_steps.py --baseline bfd0084 --batch 5000 --rounds 7

The baseline's ``rows.py`` is read with ``git show <baseline>:plugins/wildfire/storage/rows.py`` and loaded as a
module beside this tree's, so both run in one process on the same FIRMS-shaped batch (``bench_storage.
firms_record``), alternately, with the cycle collector paused as the consumer pauses it while decoding. Steps:
``wire`` (the canonical wire records decoded by msgspec), ``typed`` (the kind's typed columns from the
payloads), ``columns`` (the whole column-wise fast path, ``_decode_columns``), ``build_batch`` (decode plus grouping into a
``StorageBatch``), ``consumer_decode`` (``StorageConsumer._decode`` of the baseline's ``consumer.py`` and of this
tree's, on real ``confluent_kafka.Message`` objects: the per-message reads and offset bookkeeping plus
``build_batch``). Every step's output is checked equal between the
two before timing; times are this thread's CPU time. Per round and step the two run back to back (order alternating by round). Reported per step:
µs per record (median of rounds) for each and the median of the per-round ratios this/baseline.
Writes ``docs/results/decode_steps.json``.

With ``--baseline`` at the tree's own commit both sides are the same code: the ratios then show the host's noise
floor, and the µs per step show where the consumer's decode CPU goes. Trims tried against it and dropped
because they measured no better (docs/storage.md): reading the message fields by ``map`` over
``confluent_kafka.Message`` methods with per-partition offsets from dicts (0.40 vs 0.24 µs per message for the
loop it would replace), ``attrgetter``/``zip`` column transposition instead of per-field list comprehensions and no
per-record ``(kind, row)`` pairs in ``build_batch`` (within +-5 %).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT), str(HERE)]


def load_baseline(commit: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{commit}:plugins/wildfire/storage/rows.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("baseline_rows")
    mod.__file__ = f"{commit}:plugins/wildfire/storage/rows.py"
    sys.modules["baseline_rows"] = mod  # dataclasses look their module up while the class is made
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own file at a known commit
    mod.__source__ = src  # type: ignore[attr-defined]
    return mod


def load_baseline_consumer(commit: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{commit}:plugins/wildfire/storage/consumer.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("baseline_consumer")
    mod.__file__ = f"{commit}:plugins/wildfire/storage/consumer.py"
    sys.modules["baseline_consumer"] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own file at a known commit
    mod.__source__ = src  # type: ignore[attr-defined]
    return mod


def messages_of(values: list[bytes]) -> list[Any]:
    """Real ``confluent_kafka.Message`` objects, as ``consume()`` hands them out: runs of 3 partitions."""
    from confluent_kafka import Message

    return [Message(topic="wildfire-satellite", partition=i * 3 // len(values), offset=1000 + i,
                    key=bytes(rows_key(v)), value=v) for i, v in enumerate(values)]


def rows_key(value: bytes) -> bytes:
    start = value.index(b'"key":"') + 7
    return value[start:value.index(b'"', start)]


def steps(rows: Any, values: list[bytes], consumer_cls: Any, msgs: list[Any]) -> dict[str, Any]:
    positions = [("t", 0, i, v) for i, v in enumerate(values)]
    keys: list[bytes | None] = [None] * len(values)
    # The consumer's _decode needs only these of its instance: the batch step is the method itself.
    fake = types.SimpleNamespace(dlq_topic="wildfire-dlq", max_value_bytes=rows.MAX_VALUE_BYTES,
                                 stats=types.SimpleNamespace(messages=0))
    wires = rows._decode_wires(values) if hasattr(rows, "_decode_wires") else list(map(rows._WIRE.decode, values))
    payloads = [w.payload for w in wires]
    return {
        "wire": lambda: rows._decode_wires(values) if hasattr(rows, "_decode_wires")
        else list(map(rows._WIRE.decode, values)),
        "typed": lambda: rows._typed_columns("fire_detection", payloads),
        "columns": lambda: rows._decode_columns(values),
        "build_batch": lambda: rows.build_batch(positions, keys),
        "consumer_decode": lambda: consumer_cls._decode(fake, msgs),
    }


def timed(f: Any, n: int, reps: int) -> float:
    gc.disable()
    try:
        t = time.thread_time()  # CPU time of this thread: a busy host's preemptions do not count
        for _ in range(reps):
            f()
        return (time.thread_time() - t) / reps / n * 1e6
    finally:
        gc.enable()
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5, help="calls per step per round")
    ap.add_argument("--baseline", default="bfd0084")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bench_storage import firms_record
    from results import machine, write_result

    from wildfire.storage import rows as this

    before = machine()
    from wildfire.storage.consumer import StorageConsumer

    base = load_baseline(args.baseline)
    base_consumer = load_baseline_consumer(args.baseline).StorageConsumer
    values = [firms_record(i) for i in range(args.batch)]
    msgs = messages_of(values)
    sides = {"baseline": steps(base, values, base_consumer, msgs), "this": steps(this, values, StorageConsumer, msgs)}
    for name in sides["this"]:
        a, b = sides["baseline"][name](), sides["this"][name]()
        if name == "build_batch":
            a, b = (a.rows, a.positions, a.dead_letters), (b.rows, b.positions, b.dead_letters)
        elif name == "consumer_decode":
            a = (a[0].rows, a[0].positions, a[0].dead_letters, list(a[1].items()), list(a[2].items()))
            b = (b[0].rows, b[0].positions, b[0].dead_letters, list(b[1].items()), list(b[2].items()))
        elif name == "wire":
            a, b = [tuple(getattr(w, f) for f in w.__struct_fields__) for w in a], \
                [tuple(getattr(w, f) for f in w.__struct_fields__) for w in b]
        if a != b:
            raise SystemExit(f"step {name}: this tree's output differs from {args.baseline}'s")
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        # Per step, the two back to back (order alternating by round): load drifts less within a pair.
        order = ("baseline", "this") if r % 2 == 0 else ("this", "baseline")
        res: dict[str, dict[str, float]] = {"baseline": {}, "this": {}}
        for name in sides["this"]:
            for side in order:
                res[side][name] = round(timed(sides[side][name], args.batch, args.reps), 3)
        rounds.append(res)
    med = statistics.median
    summary: dict[str, Any] = {}
    same = all(sys.modules[f"baseline_{m}"].__dict__.get("__source__") == (ROOT / f"plugins/wildfire/storage/{m}.py")
               .read_text() for m in ("rows", "consumer"))
    summary["code_identical_to_baseline"] = same
    print(f"{'step':<12}{'baseline µs/rec':>17}{'this µs/rec':>13}{'this/base':>11}")
    for name in sides["this"]:
        b = med(x["baseline"][name] for x in rounds)
        t = med(x["this"][name] for x in rounds)
        ratio = med(x["this"][name] / x["baseline"][name] for x in rounds)
        summary[name] = {"baseline_us_per_record": round(b, 3), "this_us_per_record": round(t, 3),
                         "ratio": round(ratio, 3)}
        print(f"{name:<12}{b:>17.2f}{t:>13.2f}{ratio:>11.2f}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    path = write_result(
        "decode_steps", command=f"tests/performance/bench_decode_steps.py --batch {args.batch} --rounds "
                                f"{args.rounds} --baseline {args.baseline}",
        inputs={"batch": args.batch, "reps": args.reps, "baseline": args.baseline,
                "record_shape": "bench_storage.firms_record"},
        rounds=rounds, summary=summary,
        goals=[{"name": "storage consumer decode CPU per record, this / baseline (StorageConsumer._decode, median of "
                         "round ratios)" + ("; rows.py and consumer.py are the baseline's: the ratio is the host's "
                                            "noise floor" if same else ""),
                "figure": f"{summary['consumer_decode']['ratio']:.2f} "
                          f"({summary['consumer_decode']['this_us_per_record']:.2f} vs "
                          f"{summary['consumer_decode']['baseline_us_per_record']:.2f} µs)",
                "met": None}],
        machine_before=before, out=Path(args.out) if args.out else None)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
