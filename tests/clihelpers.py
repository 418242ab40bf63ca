"""Run the real ``psmsearch`` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m psmsearch ARGS`` with a clean plugin environment unless ``env`` says otherwise."""
    full_env = {k: v for k, v in os.environ.items() if k != "PSMSEARCH_PLUGINS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "psmsearch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table as printed, each cell's wrapped lines joined by spaces.

    A line whose first cell is empty continues the row above (its text wrapped inside the cells).
    """
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{above} {below}".strip() for above, below in zip(rows[-1], cells)]
    return rows
