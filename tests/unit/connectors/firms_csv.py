"""CSV helpers shared by the FIRMS parser tests: read a response into rows, write rows back as a response."""

from __future__ import annotations

import csv
import io


def rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def write(rows_: list[dict[str, str]], columns: list[str], line_end: str = "\n") -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator=line_end, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows_)
    return buf.getvalue().encode()
