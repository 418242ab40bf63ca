"""MLflow tracking: one parent run per search, one nested run per trial, created by psmsearch itself.

Runs are addressed by id through :class:`mlflow.tracking.MlflowClient` (never the fluent
"active run" stack), so threads, Ray workers and a resumed process can all write to the right run.
SQLite is shared by concurrent searches, so every write is retried while the database is locked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from psmsearch import interrupts

try:
    import fcntl
except ImportError:  # Windows: no schema-creation lock (concurrent first use is then unsupported)
    fcntl = None  # type: ignore[assignment]

SEARCH_TAG = "psmsearch.search"
STORAGE_TAG = "psmsearch.storage"
SUPERSEDED_TAG = "psmsearch.superseded"  # a parent run of an earlier study of the same name and storage
STORAGE_ID_TAG = "psmsearch.storage_id"
TRIAL_TAG = "psmsearch.trial"
KIND_TAG = "psmsearch.kind"
T = TypeVar("T")
# Errors two processes provoke when they create or write the same SQLite store at once; a retry succeeds.
TRANSIENT_SQLITE_ERRORS = (
    "database is locked",
    "database is busy",
    "unique constraint failed: experiments",
    "unique constraint failed: alembic_version",
    "already exists",
)


def default_tracking_uri() -> str:
    """MLflow's own default (``sqlite:///mlflow.db`` in the working directory), made absolute.

    An absolute URI lets Ray workers, whose working directory differs, write to the same store.
    """
    import mlflow

    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())


def absolute_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


_SERVER_SCHEMES = ("http", "https")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_OTHER_SCHEMES = ("databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str, where: str) -> None:
    """Raise a ConfigError naming ``where`` (``--tracking-uri``, a file's field) unless ``uri`` can work.

    Checked before a search creates anything, since MLflow reports these cases with tracebacks
    (a SQLite file in a missing folder, an unknown scheme, the file store it no longer writes) or,
    for a server that does not answer, retries for minutes. A reachable server and an existing
    folder are what this checks; credentials and schemas are left to MLflow.
    """
    from psmsearch.errors import ConfigError

    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower().split("+")[0]
    allowed = ", ".join(f"{s}://" for s in (*_DATABASE_SCHEMES, *_SERVER_SCHEMES, *_OTHER_SCHEMES))
    if not sep or scheme == "file":
        raise ConfigError(f"{uri!r} is a file store, which MLflow no longer writes; use a database such as "
                          "sqlite:///mlflow.db (MLflow's default) or a tracking server", field=where)
    if scheme == "sqlite":
        if sqlite_in_memory(uri):
            raise ConfigError(f"{uri!r} is an in-memory database, lost when the command ends (and MLflow would "
                              "write a file named ':memory:'); use a file such as sqlite:///mlflow.db", field=where)
        problem = sqlite_folder_problem(uri)
        if problem is not None:
            raise ConfigError(f"{uri!r}: {problem}", field=where)
        return
    if scheme in _SERVER_SCHEMES:
        _check_reachable(uri, where)
        return
    if scheme not in (*_DATABASE_SCHEMES, *_OTHER_SCHEMES):
        raise ConfigError(f"{uri!r}: unknown tracking URI scheme {scheme!r}; expected one of {allowed}", field=where)


def _sqlite_database(uri: str) -> str:
    """The database part of a ``sqlite://`` URI as SQLite reads it: ``sqlite:///x.db`` -> ``x.db``,
    ``sqlite:////abs/x.db`` -> ``/abs/x.db``; the query string (``?timeout=30``) is not part of it."""
    rest = uri.partition("://")[2].partition("?")[0]
    return rest[1:] if rest.startswith("/") else rest


def sqlite_in_memory(uri: str) -> bool:
    """Whether a ``sqlite://`` URI names an in-memory database (``sqlite://``, ``sqlite:///``,
    ``sqlite:///:memory:?cache=shared``, also once :func:`absolute_uri` made it ``/cwd/:memory:``):
    nothing written there outlives the command."""
    database = _sqlite_database(uri)
    return not database or Path(database).name == ":memory:"


def sqlite_folder_problem(uri: str) -> str | None:
    """What is wrong with the folder of a ``sqlite:///`` URI's file (it does not exist, or is a file; or
    the path starts with ``~``, which SQLite does not expand), or ``None``: SQLite then fails with an
    error naming neither the URI nor the folder."""
    database = _sqlite_database(uri)
    if not database:
        return None
    if database.startswith("~"):
        return f"SQLite does not expand '~' (it would look for a folder named '~'); write the full path: " \
               f"sqlite:///{Path(database).expanduser()}"
    folder = Path(database).parent.resolve()
    if folder.is_dir():
        return None
    if folder.exists():
        return f"{str(folder)!r}, the folder of the SQLite file, is not a folder"
    return f"the folder {str(folder)!r} of the SQLite file does not exist"


def _check_reachable(uri: str, where: str, timeout: float = 5.0) -> None:
    """A TCP connection to the server of an ``http(s)://`` URI, within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlsplit

    from psmsearch.errors import ConfigError

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if not parts.hostname:
        raise ConfigError(f"{uri!r} names no host", field=where)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"cannot reach the tracking server at {parts.hostname}:{port} within {timeout:g} s "
                          f"({err.strerror or err}); start it (mlflow server ...) or use another URI",
                          field=where) from None


def retry_locked(fn: Callable[[], T], attempts: int = 40, delay: float = 0.25) -> T:
    """Call ``fn``, retrying while SQLite reports a transient conflict with another process.

    Each call runs whole, a Ctrl-C held back until it returns (:func:`psmsearch.interrupts.deferred`): cut
    inside SQLAlchemy, it could leave a transaction holding the store's lock.
    """
    for attempt in range(attempts):
        try:
            with interrupts.deferred():
                return fn()
        except Exception as err:  # noqa: BLE001 - narrowed by the message below
            text = str(err).lower()
            transient = any(marker in text for marker in TRANSIENT_SQLITE_ERRORS)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + attempt % 4))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite store while it is opened for the first time.

    MLflow and Optuna create and migrate their schema on first use; two processes doing that at
    once on one file collide (duplicate columns, half-written version tables). Other URIs pass.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or fcntl is None:
        yield
        return
    lock_path = Path(uri[len(prefix) :] + ".init-lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


SCHEMA_LOGGERS = ("mlflow.store.db.utils", "alembic")
"""Loggers that report a tracking store's schema creation and migrations at INFO."""


@contextlib.contextmanager
def quiet_schema_setup() -> Iterator[None]:
    """Raise :data:`SCHEMA_LOGGERS` to WARNING while a tracking store is opened, then restore them.

    Opening a new SQLite store printed MLflow's 'INFO mlflow.store.db.utils: Creating initial MLflow
    database tables...' and 'Updating database tables' among a search's own lines (``make demo``);
    warnings and errors from the same loggers still show.
    """
    loggers = [logging.getLogger(name) for name in SCHEMA_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def param_text(value: Any) -> str:
    """MLflow param text: scalars as ``str``, containers as JSON (MLflow caps values at 6000 chars)."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)
    return text[:6000]


def _storage_tags(storage: str) -> dict[str, str]:
    """The tags that tell searches of one name in different storages apart (none without a storage).

    The storage is made absolute first (one file, one search, from any working directory) and any
    password in it is masked: the tag is readable by everyone who can read the tracking server.
    """
    if not storage:
        return {}
    shown = without_password(absolute_uri(storage))
    return {STORAGE_TAG: shown, STORAGE_ID_TAG: hashlib.sha256(shown.encode()).hexdigest()[:20]}


def without_password(url: str) -> str:
    """``scheme://user:***@host/...`` for a URL with a password; anything else unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _parent_filter(search: str, identity: Mapping[str, str]) -> str:
    query = f"tags.`{SEARCH_TAG}` = '{search}' and tags.`{KIND_TAG}` = 'search'"
    if STORAGE_ID_TAG in identity:
        query += f" and tags.`{STORAGE_ID_TAG}` = '{identity[STORAGE_ID_TAG]}'"
    return query


class ParamsRefused(Exception):
    """MLflow refused a trial run's parameters (a name it does not accept); ``run_id`` is the run,
    created and still RUNNING, for the caller to close with the trial's failure."""

    def __init__(self, run_id: str, cause: Exception) -> None:
        self.run_id = run_id
        self.cause = cause
        super().__init__(f"{type(cause).__name__}: {cause}")


@dataclass
class Tracker:
    """Writes a search and its trials to one MLflow experiment."""

    tracking_uri: str
    experiment: str
    create: bool = True

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        with sqlite_init_lock(self.tracking_uri), quiet_schema_setup():  # the client creates (migrates) the store
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = retry_locked(self._experiment_id)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            from psmsearch.errors import ConfigError

            raise ConfigError(
                f"the MLflow experiment {self.experiment!r} at {self.tracking_uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}), or pass another --experiment",
                field="--experiment",
            )
        if found is not None:
            return found.experiment_id
        if not self.create:
            from psmsearch.errors import ConfigError, suggest

            names = [e.name for e in self.client.search_experiments()]
            raise ConfigError(
                f"no MLflow experiment {self.experiment!r} at {self.tracking_uri}.{suggest(self.experiment, names)} "
                f"Experiments there: {', '.join(sorted(names)) or 'none'}",
                field="--experiment",
            )
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another process created it first
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def parent_run(self, search: str, tags: Mapping[str, str], params: Mapping[str, Any], storage: str = "",
                   fresh: Callable[[], bool] = lambda: False) -> str:
        """The search's parent run: reopened on resume, else created.

        A search is its name and its ``storage`` (the Optuna storage or Ray results folder): two
        studies of one name in different storages are two searches, and their trials never share a
        parent run. The storage is matched by a digest tag (``STORAGE_ID_TAG``), since MLflow's
        filter strings cannot quote every path.

        ``fresh()`` says whether the study holds no trials yet. A parent run that already has trial
        runs then belongs to an earlier study of the same name and storage (the database was
        deleted, the results folder removed): it is tagged superseded and left as it is, and a new
        parent is created, so two studies never share a parent run or trial names. ``fresh`` is asked
        after the trial runs were found: a study's trial exists before its run does, so a process
        that joins a new study just after another started its first trial does not take that
        trial's parent for an old one.
        """
        identity = _storage_tags(storage)
        query = _parent_filter(search, identity)
        runs = self._current_parents(query)
        if not runs and identity:
            runs = self._untagged_parent(search, identity)
        if runs and self._has_trial_runs(runs[0].info.run_id) and fresh():
            for run in runs:
                retry_locked(lambda run_id=run.info.run_id: self.client.set_tag(run_id, SUPERSEDED_TAG, "true"))
            runs = []
        if runs:
            run_id = runs[0].info.run_id
            retry_locked(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        run = retry_locked(
            lambda: self.client.create_run(
                self.experiment_id, run_name=search, tags={SEARCH_TAG: search, KIND_TAG: "search", **identity, **tags}
            )
        )
        self.log_params(run.info.run_id, params)
        return self._settle_parent(query, run.info.run_id)

    def _untagged_parent(self, search: str, identity: Mapping[str, str]) -> list[Any]:
        """A parent run of ``search`` written before searches were told apart by storage (no storage tag),
        adopted by tagging it, so that resuming such a search continues its parent run."""
        candidates = retry_locked(lambda: self.client.search_runs(
            [self.experiment_id], filter_string=_parent_filter(search, {}), max_results=100))
        legacy = [run for run in candidates if STORAGE_ID_TAG not in run.data.tags]
        if not legacy:
            return []
        oldest = min(legacy, key=lambda run: (run.info.start_time, run.info.run_id))
        for key, value in identity.items():
            retry_locked(lambda k=key, v=value: self.client.set_tag(oldest.info.run_id, k, v))
        return [oldest]

    def _current_parents(self, query: str) -> list[Any]:
        """Parent runs matching ``query`` that no later study has superseded, newest first."""
        runs = retry_locked(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=100))
        return [run for run in runs if run.data.tags.get(SUPERSEDED_TAG) != "true"]

    def _has_trial_runs(self, parent: str) -> bool:
        query = f"tags.`mlflow.parentRunId` = '{parent}'"
        return bool(retry_locked(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)))

    def _settle_parent(self, query: str, mine: str) -> str:
        """Two processes starting the same search at once may both create a parent run: all of them
        keep the oldest one (same rule everywhere, so they agree) and the others are deleted."""
        parents = self._current_parents(query)
        keep = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        if keep != mine:
            retry_locked(lambda: self.client.delete_run(mine))
        return keep

    def trial_run(self, parent_id: str, search: str, number: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A nested run for one trial (``mlflow.parentRunId`` = the search's run)."""
        run = retry_locked(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=f"{search}-trial-{number}",
                tags={"mlflow.parentRunId": parent_id, SEARCH_TAG: search, KIND_TAG: "trial", TRIAL_TAG: str(number), **tags},
            )
        )
        try:
            self.log_params(run.info.run_id, params)
        except Exception as err:  # noqa: BLE001 - the caller fails the trial and closes this run
            raise ParamsRefused(run.info.run_id, err) from err
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), 90):
            batch = items[start : start + 90]
            retry_locked(lambda: self.client.log_batch(run_id, params=batch))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v and abs(float(v)) != float("inf")
        ]
        if items:
            retry_locked(lambda: self.client.log_batch(run_id, metrics=items))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        retry_locked(lambda: self.client.log_batch(run_id, tags=items))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        retry_locked(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach the file at ``path`` to the run, in the folder ``artifact_path`` of its artifacts (default: their root)."""
        retry_locked(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED, FAILED or KILLED."""
        retry_locked(lambda: self.client.set_terminated(run_id, status=status))

    def runs(self, search: str | None = None, kind: str = "trial", parent: str | None = None) -> list[Any]:
        """All runs of this experiment of one kind (``trial`` or ``search``), optionally of one search
        (by name) and of one parent run (a search's trials: the name alone may cover several storages)."""
        query = f"tags.`{KIND_TAG}` = '{kind}'"
        if search:
            query += f" and tags.`{SEARCH_TAG}` = '{search}'"
        if parent:
            query += f" and tags.`mlflow.parentRunId` = '{parent}'"
        out: list[Any] = []
        token = None
        while True:
            page = retry_locked(
                lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000, page_token=token)
            )
            out.extend(page)
            token = page.token
            if not token:
                return out
