"""``python -m wildfire.spool salvage FILE``: the command line lives in ``wildfire.spool_salvage``."""

from __future__ import annotations

from wildfire.spool_salvage import main

if __name__ == "__main__":
    raise SystemExit(main())
