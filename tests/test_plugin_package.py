"""A third-party plugin package, installed from a temporary directory, is listed, checked and used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clihelpers import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "plugin_package"

USE_IN_A_MODEL = """
import torch
from psmsearch.config import ModelConfig
from psmsearch.model import build_model
torch.manual_seed(0)
model = build_model(ModelConfig(d_model=16, chunk_size=3, aggregator='gated', head={'name': 'attention', 'heads': 2}), 7).eval()
tokens = torch.randint(0, 7, (2, 11))
with torch.no_grad():
    parallel = model(tokens)
stream = model.stream(2)
streamed = torch.stack([stream.step(tokens[:, t]) for t in range(11)], 1)
print((parallel - streamed).abs().max().item())
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package copied to a temp dir and pip-installed into a separate target folder."""
    root = tmp_path_factory.mktemp("thirdparty")
    source = root / "psmsearch-gated"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    return target


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_installed_package_is_listed_by_its_entry_point(site: Path) -> None:
    result = run_cli("plugins", "--json", env=_env(site))
    assert result.returncode == 0, result.stderr
    gated = next(r for r in json.loads(result.stdout)["components"] if r["name"] == "gated")
    assert gated["plugin"] == "gated"
    assert gated["kind"] == "aggregator" and gated["associative"] is False
    assert gated["hyperparameters"][0]["name"] == "gate_bias"


def test_installed_package_passes_the_contract_suite(site: Path) -> None:
    result = run_cli("check", "gated", env=_env(site))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  aggregator:gated" in result.stdout and "FAIL" not in result.stdout


def test_installed_package_is_used_in_a_model(site: Path) -> None:
    env = {**os.environ, **_env(site)}
    result = subprocess.run([sys.executable, "-c", USE_IN_A_MODEL], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) < 1e-4


def test_without_the_package_the_name_is_unknown() -> None:
    result = run_cli("check", "gated")
    assert result.returncode == 2
    assert "unknown component 'gated'" in result.stderr
