"""A Ray search's experiment folder: where it is, its driver lock, and the checks that a new search
or a resume may run there.

A resume whose space differs from the one the experiment was started with (other than in
:data:`psmsearch.definition.RESUMABLE_FIELDS`) is refused before anything runs, as an Optuna study's is.
A Ray experiment has one driving process at a time (Tune cannot share it as Optuna shares a study):
the driver holds a lock in the experiment's folder for the whole search, and a second command on
the same experiment, ``--resume`` or not, is refused while the first one runs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no driver lock
    fcntl = None  # type: ignore[assignment]

from psmsearch.definition import changed_space_error, definition_changes, search_definition
from psmsearch.errors import ConfigError
from psmsearch.ray_searchers import _search_for_active
from psmsearch.search import SearchOptions
from psmsearch.space import SearchSpace


DEFAULT_RESULTS_DIR = "psmsearch_ray_results"
DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


def results_dir(options: SearchOptions) -> Path:
    """Where Ray keeps the experiment: ``--storage`` (a folder) or ``./psmsearch_ray_results``, absolute."""
    storage = options.storage
    if storage and storage.lower().startswith(DB_SCHEMES):
        raise ConfigError(
            f"the ray driver keeps its state in a folder, not a database: got --storage {storage!r}; "
            f"pass a folder (default ./{DEFAULT_RESULTS_DIR})",
            field="--storage",
        )
    return Path(storage or DEFAULT_RESULTS_DIR).expanduser().resolve()


TUNER_FILE = "tuner.pkl"
"""Where Tune pickles a Tuner (its search generator included) in the experiment's folder."""


CLAIM_FILE = ".psmsearch-started"
"""Created in a new Ray experiment's folder before anything else: the search's name is taken. It
records the search's objectives, dimensions and definition (JSON; see :mod:`psmsearch.definition`), which
a resume must share."""
LOCK_FILE = ".psmsearch-driver.lock"
"""Locked (``flock``) by the process driving a Ray experiment, for as long as it drives it."""


@contextmanager
def _driving(experiment: Path) -> Iterator[None]:
    """Hold the experiment's driver lock for the whole search; refuse when another process holds it.

    A Ray experiment has one driver at a time: two Tuners in one folder each sample and run their
    own trials (same numbers, one MLflow parent) and overwrite each other's state. The lock is taken
    before anything is checked or created, by new and resumed searches alike, so of two commands
    started together (``--resume`` or not) exactly one runs. The kernel drops it when the process
    dies, so a killed search never blocks its ``--resume``. Without ``fcntl`` (Windows), or on a
    file system that cannot lock (NFS mounted ``nolock``, some FUSE and Lustre mounts), the search
    runs without the lock and says so: those searches ran before the lock existed.
    """
    experiment.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(experiment / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _driven_elsewhere(experiment, os.pread(fd, 64, 0).decode(errors="replace").strip()) from None
        except OSError as err:
            print(f"warning: cannot lock {experiment / LOCK_FILE} ({err.strerror or err}): nothing stops a second "
                  "process from driving this Ray search at the same time", file=sys.stderr)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _driven_elsewhere(experiment: Path, holder: str) -> ConfigError:
    """The error for a Ray search another live process is running (it holds :data:`LOCK_FILE`, which
    names it as ``PID@HOST``: on shared storage the holder may be another machine)."""
    pid, _, host = holder.partition("@")
    who = (f"process {pid}" + (f" on {host}" if host else "")) if pid.isdigit() else "another process"
    return ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} is being run by {who} now; a Ray search has "
        "one driving process at a time (Tune cannot share an experiment as an Optuna study is shared): wait "
        "for it to end and then pass --resume to add trials, or choose another name with --study / another "
        "folder with --storage",
    )


def _check_new_or_resumed(experiment: Path, options: SearchOptions, space: SearchSpace) -> bool:
    """Whether the Ray experiment exists; an existing one needs ``--resume`` and the same objectives
    (as an Optuna study does).

    Called under :func:`_driving`. A new search creates :data:`CLAIM_FILE` in its folder first,
    exclusively without ``--resume`` (a search whose earlier process stopped before Tune first saved
    its state is refused then, and ``--resume`` starts it anew), and records its objectives there.
    Existence is what ``Tuner.can_restore`` checks (a saved ``tuner.pkl``), read without importing Ray.
    """
    exists = (experiment / TUNER_FILE).is_file()
    if exists and not options.resume:
        raise ConfigError(
            f"a Ray search {experiment.name!r} already exists in {experiment.parent}; pass --resume to continue it, "
            "or choose another name with --study / another folder with --storage",
        )
    if exists:
        _check_objectives(experiment, space)
        _check_definition(experiment, space)
        return True
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (0 if options.resume else os.O_EXCL)
    try:
        fd = os.open(experiment / CLAIM_FILE, flags, 0o644)
    except FileExistsError:
        raise ConfigError(
            f"a Ray search {experiment.name!r} was already started in {experiment.parent} (by a process "
            "that stopped before Tune saved any state); pass --resume to restart it, "
            "or choose another name with --study / another folder with --storage",
        ) from None
    with os.fdopen(fd, "w") as claim:
        json.dump({"objectives": _objectives(space), "dimensions": space.dimension_record(),
                   "definition": search_definition(space)}, claim)
    return False


def _objectives(space: SearchSpace) -> list[dict[str, str]]:
    """The space's objectives as recorded in the claim file."""
    return [o.model_dump() for o in space.objectives]


def _shown(objectives: list[dict[str, str]]) -> str:
    """``acc_2x (maximize), state_bytes_64 (minimize)``."""
    return ", ".join(f"{o.get('metric')} ({o.get('direction')})" for o in objectives)


def _check_objectives(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's objectives, recorded in its claim, must be the space's.

    Tune restores the searcher and the scheduler with the objectives they were made with: a resume
    with others failed in Tune's loop, with a traceback, once the first new trial reported. An
    experiment without the record (made before it was written) is not checked.
    """
    try:
        recorded = json.loads((experiment / CLAIM_FILE).read_text())["objectives"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded != _objectives(space):
        raise ConfigError(
            f"the Ray search {experiment.name!r} in {experiment.parent} was started with the objectives "
            f"{_shown(recorded)}, but the space asks for {_shown(_objectives(space))}; a restored search keeps "
            "ranking by its own: resume it with those objectives, or choose another name with --study",
            field="objectives",
        )


RAY_RESTORE_REASON = ("Trials of one search must be trained and sampled alike to be ranked together, and a restored "
                      "Ray search samples from the space it was saved with (Tune restores its searcher and takes no other).")


def _check_definition(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's definition, recorded in its claim, must be the space's (see
    :mod:`psmsearch.definition`): the Optuna driver checks its studies the same way.

    Tune restores the searcher with the dimensions it was saved with, while each trial is built
    from the file: a changed ``train.steps`` trained the new trials otherwise than the first ones,
    and a new or re-ranged dimension failed them with Optuna's FixedTrial error. A claim without the
    record (written before it was kept) is checked on its dimensions, and the record is added to it.
    """
    claim_path = experiment / CLAIM_FILE
    try:
        claim = json.loads(claim_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(claim, dict):
        return
    recorded = claim.get("definition")
    if not isinstance(recorded, dict):
        _check_dimensions(experiment, space)
        claim["definition"] = search_definition(space)
        claim_path.write_text(json.dumps(claim))  # under the driver lock: no other process writes it now
        return
    changes = definition_changes(recorded, space)
    if changes:
        raise changed_space_error(f"the Ray search {experiment.name!r} in {experiment.parent}", changes, space,
                                  why=RAY_RESTORE_REASON)


def _check_dimensions(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's dimensions, recorded in its claim, must be the space's (claims written
    before the whole definition was recorded; see :func:`_check_definition`).

    Tune restores the searcher, which samples from the space it was saved with, while each trial's
    configuration is rebuilt from the file: a new or re-ranged dimension made trials fail with
    Optuna's FixedTrial error about a parameter or value it did not know. ``Tuner.restore`` takes no
    other searcher, so a changed space is refused by name before anything runs. An experiment
    without the record (started before it was written) is not checked.
    """
    try:
        recorded = json.loads((experiment / CLAIM_FILE).read_text())["dimensions"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    current = json.loads(json.dumps(space.dimension_record()))  # as the claim holds it
    changes = _dimension_changes(recorded, current)
    if not changes:
        return
    first = next((path for path in current if recorded.get(path) != current[path]), None)
    raise ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} was started with another search space: "
        f"{'; '.join(changes)}. {RAY_RESTORE_REASON} Restore the space file as it was to resume it, or start a "
        "new search with --study NAME",
        source=space.source.where(first) if first else space.source.source, field=first,
    )


def _dimension_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two dimension records, one phrase per parameter, in the space's order."""
    changes = [f"{path} is new ({_shown_dimension(spec)})" if path not in recorded else
               f"{path} was {_shown_dimension(recorded[path])}, now {_shown_dimension(spec)}"
               for path, spec in current.items() if recorded.get(path) != spec]
    changes += [f"{path} ({_shown_dimension(spec)}) was removed" for path, spec in recorded.items() if path not in current]
    return changes


def _shown_dimension(spec: Any) -> str:
    """``{choice: [1, 2, 4]}`` or ``{float: [0.001, 0.1], log: true}``, as a space file writes it."""
    if not isinstance(spec, dict):
        return json.dumps(spec)
    return "{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in spec.items()) + "}"


def _release_claim(experiment: Path) -> None:
    """Give the name back when a new search stops before Tune has saved anything (a tracking error)."""
    (experiment / CLAIM_FILE).unlink(missing_ok=True)


def saved_with_fixed_budget(experiment: Path) -> bool:
    """Whether a restorable Ray experiment was saved by a psmsearch from before ``--resume`` could raise
    its budget (commit 9e2c35e): its ``tuner.pkl`` then holds a plain ``OptunaSearch``, where every
    later one holds a reference to :func:`psmsearch.ray_searchers._search_for_active` (how
    :class:`psmsearch.ray_searchers.BudgetedSearch` pickles).

    Tune restores such a search with its first command's ``--trials`` and ``--jobs``, and
    ``Tuner.restore`` takes no other search algorithm, so a larger ``--trials`` samples nothing.
    """
    pickled = experiment / TUNER_FILE
    return pickled.is_file() and _search_for_active.__name__.encode() not in pickled.read_bytes()


def _fixed_budget_error(experiment: Path, held: int, asked: int) -> ConfigError:
    """The error for a resume that asked an old-format experiment for more trials than it can sample."""
    return ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} was saved by a psmsearch from before "
        f"--resume could add trials (commit 9e2c35e): its saved searcher keeps its first command's --trials and "
        f"--jobs, so it holds {held} ended trials and samples no more (asked for {asked}); start a new search "
        "with --study NAME to run more trials (compare shows each search's trials)",
        field="--trials",
    )
