"""What defines a search (psmsearch.definition): recorded when a search starts, compared on --resume.

The drivers' refusals of a changed space run end to end in tests/test_search.py and tests/test_ray_driver.py;
here the record itself: which fields count, defaults filled in, and how each change is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from searchhelpers import TINY_SPACE


def _load(directory: Path, filename: str = "space.yaml", **changes: Any) -> Any:
    """TINY_SPACE with top-level ``changes`` (``name`` included), written to ``directory/filename`` and loaded."""
    from psmsearch.space import load_space

    path = directory / filename
    path.write_text(yaml.safe_dump({**TINY_SPACE, **changes}, sort_keys=False))
    return load_space(path, smoke_samples=1)


def _recorded(space: Any) -> dict[str, Any]:
    """The definition as a study or a claim file holds it: through JSON."""
    from psmsearch.definition import search_definition

    return json.loads(json.dumps(search_definition(space)))


def _changes(tmp_path: Path, **changes: Any) -> list[str]:
    from psmsearch.definition import definition_changes

    return [phrase for _, phrase in definition_changes(_recorded(_load(tmp_path)), _load(tmp_path, "changed.yaml", **changes))]


def test_writing_out_a_default_is_no_change(tmp_path: Path) -> None:
    """Defaults are filled in (the trial schema's, the task's and each component's declared ones), so a
    value written out that equals the default changes nothing, and a default left out is still recorded."""
    task = {**TINY_SPACE["task"], "eval_seed": 0}
    model = {**TINY_SPACE["model"], "dropout": 0.0, "head": {**TINY_SPACE["model"]["head"], "mlp_ratio": 2}}
    assert _changes(tmp_path, task=task, model=model, train={**TINY_SPACE["train"], "lr": 3.0e-3}, seed=0) == []
    record = _recorded(_load(tmp_path))
    assert record["train.lr"] == 0.003 and record["task.eval_seed"] == 0 and record["model.head.attention.mlp_ratio"] == 2


def test_what_may_change_on_resume_is_not_recorded(tmp_path: Path) -> None:
    driver = {**TINY_SPACE["driver"], "trials": 9, "jobs": 3, "storage": "sqlite:///other.db", "study": "s2",
              "address": "127.0.0.1:6379", "cpus_per_trial": 2, "gpus_per_trial": 1, "heartbeat_interval": 9,
              "grace_period": 30, "name": "ray"}
    assert _changes(tmp_path, name="renamed", description="more trials", driver=driver, device="cpu", threads=4,
                    tracking={"experiment": "elsewhere", "tracking_uri": "sqlite:///x.db"},
                    train={**TINY_SPACE["train"], "checkpoint_every": 3}) == []


@pytest.mark.parametrize(("changes", "expected"), [
    ({"train": {**TINY_SPACE["train"], "steps": 12}}, ["train.steps was 6, now 12"]),
    ({"train": {k: v for k, v in TINY_SPACE["train"].items() if k != "eval_every"}}, ["train.eval_every was 3, now 200"]),
    ({"metrics": {**TINY_SPACE["metrics"], "memory_lengths": [64, 128]}}, ["metrics.memory_lengths was [64], now [64, 128]"]),
    ({"seed": 1}, ["seed was 0, now 1"]),
    ({"driver": {**TINY_SPACE["driver"], "seed": 2, "sampler": "random"}}, ["driver.seed was 0, now 2", "driver.sampler was tpe, now random"]),
    ({"objectives": [{"metric": "acc_1x", "direction": "maximize"}]},
     ["objectives was [{metric: acc_2x, direction: maximize}], now [{metric: acc_1x, direction: maximize}]"]),
    ({"task": {**TINY_SPACE["task"], "group": "S3"}}, ["task.group was Z5, now S3"]),
    ({"model": {**TINY_SPACE["model"], "chunk_size": {"choice": [1, 2]}, "d_model": {"int": [16, 32], "step": 16}}},
     ["model.d_model was 16, now {int: [16, 32], step: 16}", "model.chunk_size was {choice: [1, 2, 4]}, now {choice: [1, 2]}"]),
    ({"model": {**TINY_SPACE["model"], "aggregator": {"choice": [{"name": "mlp", "mlp_ratio": 2}, {"name": "attention", "layers": 1, "heads": 2}]}}},
     ["model.aggregator.mlp.mlp_ratio was 1, now 2"]),
    ({"model": {**TINY_SPACE["model"], "aggregator": {"name": "mlp", "mlp_ratio": 1}}},
     ["model.aggregator was {choice: [mlp, attention]}, now mlp", "model.aggregator.attention.layers (1) was removed",
      "model.aggregator.attention.heads (2) was removed", "model.aggregator.attention.mlp_ratio (2) was removed"]),
    ({"model": {**TINY_SPACE["model"], "head": ["attention"]}},
     ["model.head.attention.layers was 1, now {int: [1, 6]}", "model.head.attention.heads was 2, now {choice: [1, 2, 4, 8]}",
      "model.head.attention.mlp_ratio was 2, now {int: [1, 8]}"]),
], ids=["steps", "a-field-left-out", "metrics", "seed", "sampling", "objectives", "task", "dimensions",
        "component-hyperparameter", "component-choice", "search-all"])
def test_each_change_is_named_with_its_old_and_new_value(tmp_path: Path, changes: dict[str, Any], expected: list[str]) -> None:
    assert _changes(tmp_path, **changes) == expected


def test_a_setting_the_record_lacks_counts_only_when_it_is_not_its_default(tmp_path: Path) -> None:
    """A record written before a setting existed (an older psmsearch, an older plugin) lacks it: at its
    default that is no change; set otherwise, it is new."""
    from psmsearch.definition import definition_changes

    record = _recorded(_load(tmp_path))
    del record["train.grad_clip"], record["model.head.attention.mlp_ratio"]
    assert definition_changes(record, _load(tmp_path, "same.yaml")) == []
    changed = _load(tmp_path, "changed.yaml", train={**TINY_SPACE["train"], "grad_clip": 0.5})
    assert [phrase for _, phrase in definition_changes(record, changed)] == ["train.grad_clip is new (0.5)"]


def test_the_error_names_the_search_each_change_the_fields_line_and_what_to_do(tmp_path: Path) -> None:
    from psmsearch.definition import changed_space_error, definition_changes

    record = _recorded(_load(tmp_path))
    changed = _load(tmp_path, "changed.yaml", train={**TINY_SPACE["train"], "steps": 12, "batch_size": 4})
    error = changed_space_error("study 'tiny' in sqlite:///s.db", definition_changes(record, changed), changed)
    line = (tmp_path / "changed.yaml").read_text().splitlines().index("  steps: 12") + 1
    assert str(error).startswith(
        f"{tmp_path / 'changed.yaml'}:{line}: train.steps: study 'tiny' in sqlite:///s.db was started with another "
        "search space: train.steps was 6, now 12; train.batch_size was 8, now 4. Trials of one search must be trained "
        "and sampled alike to be ranked together. Restore the space file as it was to resume it, or start a new search "
        "with --study NAME")
    assert str(error).endswith("may change")
