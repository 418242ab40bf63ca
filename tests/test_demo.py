"""The README's main job: the quick search separates trials that generalise from ones that do not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clihelpers import run_cli

QUICK = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"


def test_quick_search_shows_a_real_difference_between_trials(tmp_path: Path) -> None:
    shutil.copy(QUICK, tmp_path / "quick.yaml")
    result = run_cli("search", "quick.yaml", "--resume", "--json", "--no-progress", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    assert len(trials) == 6
    assert {(t["params"]["model.aggregator"], t["params"]["model.chunk_size"]) for t in trials} == {
        (a, c) for a in ("attention", "mlp") for c in ("1", "2", "4")
    }
    assert "warning" not in result.stderr  # every chunk size of the demo trains its aggregator (3 chunks or more)
    scores = {(t["params"]["model.aggregator"], t["params"]["model.chunk_size"]): t["objectives"]["acc_4x"] for t in trials if t["status"] == "complete"}
    assert scores[("attention", "1")] >= 0.9
    assert any(score < 0.5 for score in scores.values())
    assert trials[0]["params"] == {"model.aggregator": "attention", "model.chunk_size": "1"} and trials[0]["pareto"]
