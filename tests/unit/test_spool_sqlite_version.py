"""The spool and the SQLite copy a process ends up with.

The eccodes wheels behind cfgrib bundle SQLite 3.26, and a process serves every ``import sqlite3``
from whichever libsqlite3 it loaded first. Each case runs in a fresh interpreter, since import order
is per process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wildfire.spool import MIN_SQLITE, SpoolError, check_sqlite_version

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

OPEN_AND_PUT = """
import sqlite3, sys
from wildfire.config import load_config
from wildfire.priority import Priority
from wildfire.records import EncodedBatch
from wildfire.spool import BufferManager
cfg = load_config(environ={})
spool = BufferManager(cfg.spool, cfg.sources, path=sys.argv[1])
out = spool.put_batch(EncodedBatch("era5", ["k1", "k2"], [Priority.LOW] * 2, [b'{"a":1}', b'{"a":2}']))
print(sqlite3.sqlite_version, spool.depth())
"""


def run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "spool.db")], capture_output=True, text=True,
                          env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_wildfire_binds_the_system_sqlite_even_when_eccodes_comes_next(tmp_path: Path) -> None:
    res = run("import wildfire, eccodes, cfgrib\n" + OPEN_AND_PUT, tmp_path)
    assert res.returncode == 0, res.stderr
    version, depth = res.stdout.split()
    assert tuple(map(int, version.split("."))) >= MIN_SQLITE
    assert depth == "2"


def test_eccodes_first_gets_a_clear_error_not_a_syntax_error(tmp_path: Path) -> None:
    # What happened before the package imported sqlite3 itself: this order still loads the bundled copy.
    res = run("import eccodes\n" + OPEN_AND_PUT, tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import eccodes, sqlite3; print(sqlite3.sqlite_version)"],
                           capture_output=True, text=True, timeout=120)
    if tuple(map(int, probe.stdout.split(".") or [0])) >= MIN_SQLITE:
        pytest.fail(f"eccodes no longer bundles an old SQLite ({probe.stdout.strip()}): drop this test")
    assert res.returncode != 0
    assert "the spool needs SQLite >= 3.35.0" in res.stderr and "cfgrib" in res.stderr, res.stderr


def test_version_check() -> None:
    check_sqlite_version((3, 40, 1))
    check_sqlite_version(MIN_SQLITE)
    with pytest.raises(SpoolError, match=r"needs SQLite >= 3\.35\.0, but this process loaded SQLite 3\.26\.0"):
        check_sqlite_version((3, 26, 0))
