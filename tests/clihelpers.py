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
