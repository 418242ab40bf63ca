"""The README's plugin examples, as written, pass ``psmsearch check``: documentation that runs."""

from __future__ import annotations

import re
from pathlib import Path

from clihelpers import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def plugin_section_blocks() -> list[str]:
    """The ```python blocks of the README's "Writing a plugin" section, in order."""
    text = README.read_text()
    section = text[text.index("## Writing a plugin"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_aggregators_pass_the_contract_suite(tmp_path: Path) -> None:
    """Both blocks are whole plugins (imports, class and hook; the associative one was a bare class, which
    a reader had to complete). Both must pass every check, or the README teaches a broken plugin (its
    first associative example, a log-sum-exp with a -inf identity, failed 8 of 11 checks)."""
    blocks = plugin_section_blocks()
    whole = next(block for block in blocks if "@hookimpl" in block)
    associative = next(block for block in blocks if "associative = True" in block)
    name = re.search(r'name = "(\w+)"', associative).group(1)
    cls = re.search(r"class (\w+)\(Aggregator\)", associative).group(1)
    (tmp_path / "my_agg.py").write_text(whole)
    assert f"register({cls})" in associative
    (tmp_path / "my_assoc.py").write_text(associative)
    result = run_cli("--plugin", "my_agg.py", "--plugin", "my_assoc.py", "check", "gated_sum", name, cwd=tmp_path,
                     timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "30 passed, 0 failed", result.stdout


def test_the_readme_affine_gate_passes_the_contract_suite_with_the_builtin_partners(tmp_path: Path) -> None:
    """The README's "new gate for the affine family" block, as written, is a whole plugin: its encoder
    passes every check beside the built-in affine_scalar aggregator and linear_readout_scalar head,
    chunk-size invariance included (which it claims by subclassing a built-in affine encoder)."""
    block = next(block for block in plugin_section_blocks() if "def transition" in block)
    name = re.search(r'name = "(\w+)"', block).group(1)
    (tmp_path / "gate.py").write_text(block)
    result = run_cli("--plugin", "gate.py", "check", name, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"PASS  encoder:{name}" in result.stdout and "chunk_size_invariance: T=15, c in 1, 3, 4, 9" in result.stdout
    assert "with aggregator 'affine_scalar', head 'linear_readout_scalar'" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("passed, 0 failed"), result.stdout
