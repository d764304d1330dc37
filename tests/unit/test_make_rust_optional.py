"""`make demo` and `make run` work without a Rust toolchain (the polars parser gives the same records, and
one line says so); `make test` still requires and builds the compiled FIRMS extension.

The Makefile itself runs here, against a throw-away venv directory whose stamp is fresh and whose python
is the base interpreter (no extension installed), with no cargo on PATH and HOME elsewhere (the Makefile
adds ~/.cargo/bin to PATH when it exists). Nothing is installed: `-n` prints what a target would run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTICE = "the polars parser is in use"


@pytest.fixture
def no_rust(tmp_path):
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    probe = subprocess.run([str(base), "-c", "import wildfire_firms_fast"], capture_output=True)
    assert probe.returncode != 0, f"{base} has the extension: this test needs an interpreter without it"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(base)
    (venv / ".installed").touch()       # Python dependencies "installed": newer than the requirement files
    empty = tmp_path / "path"
    empty.mkdir()
    make = shutil.which("make")
    assert make, "make is needed (scripts/services.sh installs it on a fresh machine)"

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"PATH": str(empty), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        return subprocess.run([make, "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *args],
                              capture_output=True, text=True, env=env, timeout=60)

    return run


def test_demo_and_run_need_no_cargo_and_say_polars_parses(no_rust):
    out = no_rust("native-optional")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and NOTICE in lines[0] and "make test" in lines[0], out.stdout
    for target in ("demo", "run"):
        plan = no_rust("-n", target)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "need cargo" not in plan.stdout, f"make {target} would stop without Rust:\n{plan.stdout}"
        assert "./native/firms_fast" not in plan.stdout
        assert NOTICE in plan.stdout, plan.stdout     # the notice runs even in -n (a $(MAKE) line)


@pytest.mark.parametrize("target", ["test", "test-unit", "venv"])
def test_make_test_still_requires_and_builds_the_extension(no_rust, target):
    plan = no_rust("-n", target)
    assert "need cargo" in plan.stdout and "./native/firms_fast" in plan.stdout, plan.stdout


def test_building_the_extension_without_cargo_fails_with_a_clear_message(no_rust):
    out = no_rust("native")
    assert out.returncode != 0
    assert "need cargo (Rust)" in out.stdout + out.stderr

