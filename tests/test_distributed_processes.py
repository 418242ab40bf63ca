"""``--nproc N`` with real processes: a signal stops every worker, worker errors read as with one process,
evaluation lines reach the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from psmsearch import distributed as dist
from psmsearch.errors import ConfigError
from psmsearch.trainer import TrialDiverged, TrialPruned
from psmsearch.trial import TrialConfig, run_trial, run_trial_data_parallel

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
LM = {
    "task": {"name": "lm", "path": str(SHAKESPEARE), "seq_len": 32, "eval_tokens": 2048},
    "model": {"kind": "psm", "d_model": 16, "chunk_size": 8, "encoder": "embed",
              "aggregator": {"name": "attention", "layers": 1}, "head": {"name": "attention", "layers": 1}},
    "train": {"steps": 5000, "batch_size": 8, "eval_every": 100000, "checkpoint_every": 10},
    "metrics": {"enabled": False},
    "device": "cpu",
}
NAN_AGGREGATOR = '''
import torch
from psmsearch import hookimpl
from psmsearch.components import Aggregator

class NanAgg(Aggregator):
    name = "nanagg"
    state_kind = "tokens"
    associative = False
    def __init__(self, context, **hparams):
        super().__init__(context, **hparams)
        k, d = context.encoder.state_shape
        self.initial = torch.nn.Parameter(torch.zeros(k, d))
    def forward(self, older, newer):
        return newer + older * float("nan")
    def initial_state(self, batch_shape):
        return self.initial.expand(*batch_shape, *self.initial.shape)

@hookimpl
def register_aggregators(register):
    register(NanAgg)
'''


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PSMSEARCH_PLUGINS"}
    return subprocess.Popen([sys.executable, "-m", "psmsearch", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.is_file() else []


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_to_the_parent_stops_every_worker_within_a_step(tmp_path: Path, signum: int) -> None:
    """SIGTERM to the parent only: it printed "Aborted!" while its workers trained to the end of the
    budget. Now each worker stops within a step, the checkpoint written so far is kept, and the last
    line says which step it holds and how to continue (it was "Aborted!" with exit code 1, the code
    of a component failure)."""
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(LM))
    checkpoint = tmp_path / "ck.pt"
    proc = cli("train", "trial.yaml", "--nproc", "2", "--no-progress", "--checkpoint", str(checkpoint), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_file(), proc.communicate()[1]
    workers = [pid for pid in children(proc.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2
    at_signal = torch.load(checkpoint, weights_only=True)["step"]
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    waited = time.monotonic() - sent
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert waited < 10, f"the parent took {waited:.1f} s to stop"  # the 5000-step budget takes minutes
    assert not any(alive(pid) for pid in workers), "a worker outlived the parent"
    after = torch.load(checkpoint, weights_only=True)["step"]
    assert at_signal <= after < at_signal + 200 < 5000, (at_signal, after)
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: {checkpoint} holds step {after}; run the same command with --resume to continue from there")


def test_a_diverged_worker_reads_as_with_one_process(tmp_path: Path) -> None:
    """A diverged run under --nproc 2 was a 68-line traceback; one process says one line and exits 1."""
    (tmp_path / "nanagg.py").write_text(NAN_AGGREGATOR)
    config = {**LM, "model": {**LM["model"], "aggregator": "nanagg"}, "train": {"steps": 3, "batch_size": 8}}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(config))
    proc = cli("--plugin", "nanagg.py", "train", "trial.yaml", "--nproc", "2", "--no-progress", cwd=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == "trial stopped: training diverged at step 0: loss is nan"
    assert "Traceback" not in stderr and "Terminating process" not in stderr


def raise_config_error(rank: int) -> None:
    raise ConfigError(f"bad value on rank {rank}", source="trial.yaml:3", field="task.seq_len")


def test_a_forwarded_worker_error_is_raised_as_the_same_type_and_message() -> None:
    """ConfigError's keyword-only constructor defeats pickling; type, message and field survive.
    (TrialDiverged, the other kind the trial forwards, is checked end to end above.)"""
    with pytest.raises(ConfigError) as info:
        dist.launch(raise_config_error, 2, forward=(ConfigError, TrialDiverged))
    assert type(info.value) is ConfigError and info.value.field == "task.seq_len"
    assert str(info.value) in {f"trial.yaml:3: task.seq_len: bad value on rank {r}" for r in (0, 1)}
    # the worker's traceback travels as text (train --traceback under --nproc printed nothing)
    assert 'raise ConfigError(f"bad value on rank {rank}"' in info.value.worker_traceback


class WritesAtTeardown:
    """Writes a file when freed: a module-level one is freed only by the interpreter's teardown."""

    def __init__(self, path: Path) -> None:
        # what __del__ needs, held here: at teardown the modules it would look them up in are being cleared
        self.path, self.open, self.close, self.flags = str(path), os.open, os.close, os.O_CREAT | os.O_WRONLY

    def __del__(self) -> None:
        self.close(self.open(self.path, self.flags))


def print_and_register_an_exit_hook(rank: int, out_dir: str) -> None:
    import atexit

    print(f"rank {rank} done", end="")  # no newline, no flush: only the worker's own flush sends it
    atexit.register(lambda: (Path(out_dir) / f"atexit{rank}").touch())
    sys.modules[__name__].held_until_teardown = WritesAtTeardown(Path(out_dir) / f"teardown{rank}")


def test_a_finished_worker_runs_its_exit_hooks_flushes_and_skips_teardown(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that had finished and torn down its group aborted at exit in CI ("terminate called without
    an active exception"), failing a finished trial. A finished worker now leaves without the interpreter's
    teardown and C++'s static destructors, after its atexit hooks (plugins' clean-ups) and a flush."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the workers' stdout is a buffered file here
    dist.launch(print_and_register_an_exit_hook, 2, str(tmp_path))
    out = capfd.readouterr().out
    assert "rank 0 done" in out and "rank 1 done" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit0", "atexit1"]


def abort_on_rank_1(rank: int) -> None:
    from psmsearch import interrupts

    if rank == 1:
        os.abort()
    while not interrupts.STOP.is_set():  # rank 0 waits to be stopped: its peer's death is seen first
        time.sleep(0.02)


def test_a_worker_killed_by_a_fatal_signal_prints_its_python_stack(capfd: pytest.CaptureFixture[str]) -> None:
    """So that the next such abort says where it happened (CI showed only the C++ message)."""
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="process 1 terminated with signal SIGABRT"):
        dist.launch(abort_on_rank_1, 2)
    err = capfd.readouterr().err
    assert "Fatal Python error: Aborted" in err and "in abort_on_rank_1" in err, err


def test_rank_0_evaluations_reach_the_parent_callback_which_can_prune() -> None:
    """Evaluation lines were missing under --nproc: the CLI's log callback never ran. A callback that
    prunes in the parent stops the workers as it stops a single-process trial."""
    config = TrialConfig.from_dict({
        "task": {"name": "group", "group": "Z5", "train_length": 4, "eval_max_multiple": 2, "eval_samples": 16},
        "model": {"kind": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 100000, "batch_size": 8, "warmup_steps": 1, "eval_every": 3},
        "metrics": {"enabled": False},
    })
    single: list[tuple[int, dict[str, float]]] = []
    parallel: list[tuple[int, dict[str, float]]] = []

    def recorder(seen: list[tuple[int, dict[str, float]]]) -> Callable[[int, dict[str, float]], None]:
        def callback(step: int, metrics: dict[str, float]) -> None:
            seen.append((step, metrics))
            if step == 6:
                raise TrialPruned(f"pruned at {step}")
        return callback

    with pytest.raises(TrialPruned, match="pruned at 6"):
        run_trial(config, recorder(single))
    started = time.monotonic()
    with pytest.raises(TrialPruned, match="pruned at 6"):
        run_trial_data_parallel(config, 2, callback=recorder(parallel))
    assert time.monotonic() - started < 60  # the budget would take an hour
    assert [s for s, _ in parallel] == [s for s, _ in single] == [3, 6]
    for (_, ours), (_, theirs) in zip(parallel, single):
        assert ours.keys() == theirs.keys() and ours["acc_1x"] == pytest.approx(theirs["acc_1x"], abs=1e-5)
