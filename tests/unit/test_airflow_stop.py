"""``scripts/airflow.sh stop`` lets running tasks end (SIGTERM, bounded wait), then SIGKILLs what is left.

The process tree is a stand-in for ``airflow standalone`` that this test controls (a full Airflow start would
cost a minute): a leader that, like Airflow's task supervisor, passes SIGTERM on to a "task" in its own process
group and exits at once; a "component" in the leader's group that needs a moment to flush; a stuck process
that ignores SIGTERM. The stop must return only when the flushing ones have flushed, and kill the stuck one
after WILDFIRE_AIRFLOW_STOP_TIMEOUT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE = textwrap.dedent('''
    import os, signal, subprocess, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    role = sys.argv[2] if len(sys.argv) > 2 else "leader"

    def mark(name):
        (out / f"{role}.{name}").write_text(str(os.getpid()))

    if role == "leader":
        me = [sys.executable, __file__, str(out)]
        task = subprocess.Popen(me + ["task"], process_group=0)   # a task runner: a group of its own
        component = subprocess.Popen(me + ["component"])          # e.g. the triggerer: the leader's group
        stuck = subprocess.Popen(me + ["stuck"])

        def forward(*_):
            task.send_signal(signal.SIGTERM)  # what the task supervisor does, then it is gone
            mark("exited")
            os._exit(0)
        signal.signal(signal.SIGTERM, forward)
        mark("ready")
        while True:
            time.sleep(1)
    elif role == "stuck":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mark("ready")
        while True:
            time.sleep(1)
    else:
        flush_s = {"task": 2.0, "component": 1.0}[role]
        def on_term(*_):
            mark("flushing")
            time.sleep(flush_s)  # on_kill: the worker flushes its spool / the consumer commits
            mark("flushed")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        mark("ready")
        while True:
            time.sleep(1)
''')


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_stop_waits_for_tasks_to_flush_then_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    script = tmp_path / "fake_standalone.py"
    script.write_text(FAKE)
    leader = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True)
    # Reaped the moment it exits, as a detached `setsid nohup` leader is by init: no zombie keeps it "alive".
    threading.Thread(target=leader.wait, daemon=True).start()
    roles = ("leader", "task", "component", "stuck")
    try:
        deadline = time.monotonic() + 30
        while not all((out / f"{r}.ready").exists() for r in roles):
            assert time.monotonic() < deadline, sorted(p.name for p in out.iterdir())
            time.sleep(0.05)  # waiting for the processes to start; not a timed assertion
        pids = {r: int((out / f"{r}.ready").read_text()) for r in roles}
        (home / "standalone.pid").write_text(str(leader.pid))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(WILDFIRE_AIRFLOW_HOME=str(home), WILDFIRE_AIRFLOW_STOP_TIMEOUT="4")
        started = time.monotonic()
        res = subprocess.run(["bash", str(ROOT / "scripts/airflow.sh"), "stop"], env=env, capture_output=True,
                             text=True, timeout=60)
        took = time.monotonic() - started
        assert res.returncode == 0, res.stderr
        # Both flushing processes finished their on-SIGTERM work before stop returned.
        assert (out / "task.flushed").exists() and (out / "component.flushed").exists(), res.stderr
        assert not _alive(pids["task"]) and not _alive(pids["component"])
        # The one that ignores SIGTERM was killed after the bounded wait, and the stop said so.
        assert not _alive(pids["stuck"])
        assert 4 <= took < 30, took
        assert "SIGTERM to process group" in res.stderr and "still running after 4 s, killed (SIGKILL)" in res.stderr
        assert f"{pids['stuck']}" in res.stderr
        assert not (home / "standalone.pid").exists()
    finally:
        for pid in [leader.pid, *[int(p.read_text()) for p in out.glob("*.ready")]]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        leader.wait(timeout=10)


def test_stop_without_stuck_processes_reports_a_clean_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (home / "standalone.pid").write_text(str(proc.pid))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(WILDFIRE_AIRFLOW_HOME=str(home), WILDFIRE_AIRFLOW_STOP_TIMEOUT="30")
        res = subprocess.run(["bash", str(ROOT / "scripts/airflow.sh"), "stop"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "stopped: all 1 processes ended on SIGTERM" in res.stderr, res.stderr
        assert proc.wait(timeout=5) == -signal.SIGTERM
        again = subprocess.run(["bash", str(ROOT / "scripts/airflow.sh"), "stop"], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "not running" in again.stderr, again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
