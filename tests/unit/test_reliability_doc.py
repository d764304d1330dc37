"""docs/reliability.md stays true: every row of its two catalogs names a test that exists and runs.

The catalogs (hostile input, faults) are only worth reading if each outcome they state is checked by the
test they name. This test parses both tables, and for every ``tests/...py::name`` in a row's test column
checks that the file exists and defines that test function at module level (parametrized ids are not
checked). The README must link the page.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
NODE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables under each ``## heading``: heading -> rows (header cell -> cell)."""
    out: dict[str, list[dict[str, str]]] = {}
    heading = ""
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
        elif not all(set(c) <= set("-: ") for c in cells):
            out.setdefault(heading, []).append(dict(zip(header, cells, strict=False)))
    return out


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_both_catalogs_name_existing_tests_on_every_row() -> None:
    found = tables(DOC.read_text())
    hostile = next((rows for h, rows in found.items() if h.lower().startswith("hostile")), None)
    faults = next((rows for h, rows in found.items() if h.lower().startswith("fault")), None)
    assert hostile and faults, f"docs/reliability.md needs a 'Hostile input' and a 'Fault' table; found {list(found)}"
    assert len(hostile) >= 10 and len(faults) >= 8
    missing: list[str] = []
    cache: dict[str, set[str]] = {}
    for rows in (hostile, faults):
        for row in rows:
            refs = NODE.findall(row.get("test", ""))
            if not refs:
                missing.append(f"row without a test: {row}")
            for file, name in refs:
                path = ROOT / file
                if not path.exists():
                    missing.append(f"{file} does not exist")
                    continue
                names = cache.setdefault(file, functions_in(path))
                if name not in names:
                    missing.append(f"{file}::{name} is not a test function there")
            outcome = row.get("outcome") or row.get("what the system does") or ""
            assert outcome, f"row states no outcome: {row}"
    for row in faults:
        assert row.get("what is lost"), f"fault row states nothing about loss: {row}"
    assert not missing, "\n".join(missing)


def test_readme_links_the_reliability_page() -> None:
    assert "docs/reliability.md" in (ROOT / "README.md").read_text()
