"""Reaching the Ray cluster a search runs on: connecting, and the runtime environment (plugins,
start directory) shipped to its workers.

Without ``--address`` a private local cluster is started and bound to the loopback interface; with
a loopback ``--address`` (``127.0.0.1:PORT``) the driver joins a single-machine cluster started with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, Callable

from psmsearch.errors import ConfigError
from psmsearch.progress import SearchProgress
from psmsearch.registry import ENV_VAR as PLUGINS_ENV_VAR
from psmsearch.registry import env_plugin_specs
from psmsearch.search import SearchOptions
from psmsearch.tasks import LAUNCH_DIR_ENV


# Ray's single-machine mode: node address 127.0.0.1 and every Ray server bound to loopback. Read when
# ``ray`` is imported, so it is set before the first import.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def is_loopback(address: str | None) -> bool:
    """True for no address (a private local cluster) and for ``127.x.x.x:PORT`` / ``localhost:PORT``."""
    if address is None:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_runtime_env(specs: list[str]) -> dict[str, Any]:
    """The job's ``runtime_env``: plugin files and folders uploaded as ``py_modules``, named by module.

    A module name passes through unchanged: it must be installed on the cluster (as entry-point
    plugins are). Workers record the plugins by the names given here (:func:`shipped_plugin_labels`
    maps them back). The directory the command started in goes along (``PSMSEARCH_LAUNCH_DIR``): a
    Ray trial runs in a working directory of its own, and workers of a cluster joined with
    ``--address`` do not inherit the driver's environment, so a relative ``task.path`` is looked for
    there (it must exist on every node).
    """
    modules: list[str] = []
    names: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            path = path.resolve()
            modules.append(str(path))
            names.append(_shipped_name(path))
        else:
            names.append(spec)
    env_vars = {LAUNCH_DIR_ENV: os.environ.get(LAUNCH_DIR_ENV) or os.getcwd()}
    if names:
        env_vars[PLUGINS_ENV_VAR] = ",".join(names)
    env: dict[str, Any] = {"env_vars": env_vars}
    if modules:
        env["py_modules"] = modules
    return env


def _shipped_name(path: Path) -> str:
    """The module name a worker imports a shipped plugin file or folder under: ``my_agg`` for ``/x/my_agg.py``."""
    return path.stem if path.is_file() else path.name


def check_shipped_names(specs: list[str]) -> None:
    """Raise the ConfigError of two plugin files or folders that would ship under one module name.

    A worker imports a shipped plugin by its file's stem (``a/agg.py`` and ``b/agg.py`` both as
    ``agg``), so one of them would stand for both and every trial using the other's components fail
    with "unknown aggregator", where the Optuna driver, which loads each by its path, runs them.
    """
    seen: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():
            continue
        name, resolved = _shipped_name(path.resolve()), str(path.resolve())
        if name in seen and seen[name] != resolved:
            raise ConfigError(f"plugins {seen[name]} and {resolved} would both reach the Ray workers as the module "
                              f"{name!r} (a worker imports a shipped plugin by its file or folder name); rename one",
                              field="--plugin")
        seen[name] = resolved


def shipped_plugin_labels(specs: list[str]) -> dict[str, str]:
    """For each plugin file or folder shipped to the workers, its module name there -> the path the user
    gave (absolute), so that a trial's plugin tags and ``trial_config.yaml`` name the file under either
    driver: the Optuna driver's registry knows it by its path, a Ray worker's by its module name."""
    labels: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            labels[_shipped_name(path.resolve())] = spec
    return labels


def _prepare_environment(options: SearchOptions) -> None:
    """Quiet Ray and, for a local cluster, keep it on loopback; must run before ``ray`` is imported."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if is_loopback(options.address):
        os.environ.setdefault(LOOPBACK_ENV, "0")


def _connect(options: SearchOptions, progress: SearchProgress | None) -> bool:
    """Join ``options.address`` or start a private loopback cluster; True when this call connected.

    Then the cluster must be able to hold one trial: Tune waits for the resources a trial asks for
    without end (and its warning is hidden), so a GPU asked of a CPU-only machine hung the search
    silently. A private cluster is this machine, so asking more of it is an error; a remote one may
    grow (an autoscaler), so that is a warning.
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = worker_runtime_env(env_plugin_specs())
    common: dict[str, Any] = {"runtime_env": runtime_env or None, "log_to_driver": False, "logging_level": logging.WARNING}
    note = progress.note if progress is not None else (lambda message: None)
    private = options.address in (None, "", "local")  # "local" starts a new cluster on this machine, as no address does
    try:
        if not private:
            note(f"joining the Ray cluster at {options.address}")
            ray.init(address=options.address, **common)
        else:
            note("starting a local Ray cluster (loopback only)")
            # "local" always starts a new cluster; no address would join the one Ray's temp dir names
            # (ray_current_cluster, left by `ray start` or by a dead head) or RAY_ADDRESS.
            ray.init(address="local", include_dashboard=False, **common)
    except (ConnectionError, ValueError, ray.exceptions.AuthenticationError) as err:
        hint = (
            "; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token) as for `ray start`"
        ) if not isinstance(err, ValueError) else ""
        raise ConfigError(f"cannot reach a Ray cluster at {options.address!r}: {err}{hint}", field="--address") from None
    try:
        _check_resources(options, private=private, note=note)
    except BaseException:
        ray.shutdown()
        raise
    return True


def _check_resources(options: SearchOptions, private: bool, note: Callable[[str], None]) -> None:
    """Raise (a private cluster) or note (a remote one) a trial's request the cluster cannot hold."""
    import ray

    total = ray.cluster_resources()
    for key, asked, flag in (("CPU", options.cpus_per_trial, "--cpus-per-trial"),
                             ("GPU", options.gpus_per_trial, "--gpus-per-trial")):
        have = float(total.get(key, 0.0))
        if asked <= have:
            continue
        message = f"{flag} {asked:g}: the Ray cluster has {have:g} {key}s in all, so no trial could start"
        if private:
            raise ConfigError(f"{message} (the private cluster is this machine); ask for at most {have:g}",
                              field=flag)
        note(f"warning: {message} until it grows (an autoscaler may add nodes); trials wait for it")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) within ``timeout`` seconds.

    Ray itself retries an unreachable GCS for minutes, printing only its own warnings. ``auto`` and
    ``local`` are left to Ray; anything else without a host and a numeric port is refused.
    """
    import socket

    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit():
        raise ConfigError(f"{address!r} is not a Ray cluster address; expected HOST:PORT (the head's GCS port, "
                          "6379 by default), ray://HOST:PORT (Ray Client) or auto", field="--address")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} within {timeout:g} s ({err.strerror or err}); "
                          "start it with `ray start --head` or check the address", field="--address") from None
