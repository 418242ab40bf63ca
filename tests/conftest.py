"""Shared fixtures: a fresh registry per test that changes plugins, and the repo paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Reload plugins for one test and restore the process-wide registry afterwards."""
    from psmsearch import registry

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    yield registry
    os.environ.pop(registry.ENV_VAR, None)
    registry.reset_registry()


@pytest.fixture(autouse=True)
def _launch_dir_restored():
    """The CLI records the directory it started in (``PSMSEARCH_LAUNCH_DIR``) in the environment; run
    in-process by ``CliRunner`` it would stay set for later tests and the subprocesses they start."""
    from psmsearch.tasks import LAUNCH_DIR_ENV

    saved = os.environ.get(LAUNCH_DIR_ENV)
    yield
    if saved is None:
        os.environ.pop(LAUNCH_DIR_ENV, None)
    else:
        os.environ[LAUNCH_DIR_ENV] = saved
