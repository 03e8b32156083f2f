"""``python -m sidecar ...``: the sidecar process without the typer CLI (sidecar/entry.py).

The same arguments as ``meshfed sidecar run``; ``meshfed up``, the drill runner and the
benchmark start sidecars this way, which keeps typer, rich and pydantic out of every
sidecar's memory (docs/performance-notes.md).
"""

from __future__ import annotations

import sys

from federation import parentwatch
from sidecar.entry import main

if __name__ == "__main__":
    parentwatch.start_from_env()  # a child of `meshfed up` ends with it
    sys.exit(main(prog="python -m sidecar"))
