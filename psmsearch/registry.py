"""Plugin loading and the component registry.

Plugins come from four places, loaded in this order through one pluggy manager:

1. the built-in default plugins (:data:`DEFAULT_PLUGINS`, ordinary modules under ``psmsearch.plugins``);
2. installed packages exposing an entry point in the group ``psmsearch``;
3. ``PSMSEARCH_PLUGINS``: comma-separated module names or paths to ``.py`` files / package folders;
4. paths or module names passed explicitly (the CLI's ``--plugin PATH``).

A plugin that fails to import, or whose hook raises, is recorded in :attr:`Registry.failures`
with its name and error; everything else still loads. A component name registered twice for the
same kind is a failure naming both plugins (the first registration is kept).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import pluggy

from psmsearch import hookspecs
from psmsearch.components import COMPONENT_KINDS, HyperParameter
from psmsearch.errors import PluginError, UnknownComponentError
from psmsearch.plugin_digest import module_digest, plugin_digest

PROJECT = "psmsearch"
ENV_VAR = "PSMSEARCH_PLUGINS"
DEFAULT_PLUGINS: tuple[str, ...] = ("psmsearch.plugins.token_state", "psmsearch.plugins.tasks", "psmsearch.plugins.affine")
KINDS: tuple[str, ...] = ("encoder", "aggregator", "head", "task")
HOOK_NAMES: tuple[str, ...] = tuple(sorted(name for name in dir(hookspecs)
                                           if hasattr(getattr(hookspecs, name), f"{PROJECT}_spec")))
HOOK_FOR_KIND = {
    "encoder": "register_encoders",
    "aggregator": "register_aggregators",
    "head": "register_heads",
    "task": "register_tasks",
}


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component (or task) and where it came from."""

    name: str
    kind: str
    plugin: str
    cls: type
    state_kind: str | None
    associative: bool | None
    hyperparameters: tuple[HyperParameter, ...]
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape printed by ``psmsearch plugins --json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "plugin": self.plugin,
            "state_kind": self.state_kind,
            "associative": self.associative,
            "hyperparameters": [hp.as_dict() for hp in self.hyperparameters],
            "options": dict(getattr(self.cls, "options", {})),
            "description": self.description,
        }


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or registered something invalid.

    ``source`` says how the plugin came to be loaded: ``named`` (``--plugin`` or ``PSMSEARCH_PLUGINS``,
    the user's own choice for this run), ``installed`` (an installed package's entry point, loaded in
    every run) or ``built-in``. See :func:`require_loaded_plugins` for what each means to a run.
    """

    plugin: str
    error: str
    detail: str = ""
    source: str = "named"

    def __str__(self) -> str:
        where = " (installed package)" if self.source == "installed" else ""
        return f"plugin {self.plugin!r}{where}: {self.error}"

    def as_dict(self) -> dict[str, str]:
        """The JSON shape of a failure in ``psmsearch plugins --json``."""
        return {"plugin": self.plugin, "error": self.error, "detail": self.detail, "source": self.source}


@dataclass
class Registry:
    """All registered components by kind and name, the loaded plugins and the failures."""

    components: dict[str, dict[str, ComponentInfo]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    plugins: list[str] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)
    local_plugins: list[str] = field(default_factory=list)
    plugin_digests: dict[str, str] = field(default_factory=dict)
    """Plugin label -> SHA-256 of its code when it was loaded (plugins named for the run, that are files,
    folders or modules with a file, and installed packages' modules): what a trial records as the code it ran."""
    distributions: dict[str, str] = field(default_factory=dict)
    """Installed plugin label -> ``NAME==VERSION`` of the distribution that provides its entry point:
    what a trial records so that its config says which package to install to run it again."""

    def get(self, kind: str, name: str) -> ComponentInfo:
        """The component ``name`` of ``kind``; an unknown name raises with close-match suggestions."""
        if kind not in self.components:
            raise UnknownComponentError("component kind", kind, self.components)
        try:
            return self.components[kind][name]
        except (KeyError, TypeError):
            error = UnknownComponentError(kind, name, self.components[kind])
        error.args = (error.args[0] + self.failed_plugins_hint(name),)
        raise error

    def failed_plugins_hint(self, name: str) -> str:
        """What an unknown-name error adds when plugins failed: the name may be one of theirs."""
        if not self.failures:
            return ""
        plugins = ", ".join(dict.fromkeys(repr(failure.plugin) for failure in self.failures))
        return (f" These plugins failed to load or register something, and {name!r} may be one of theirs: "
                f"{plugins} (`psmsearch plugins` says why).")

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self.components[kind])

    def all(self) -> list[ComponentInfo]:
        """Every registered component, by kind then name."""
        return [self.components[k][n] for k in KINDS for n in sorted(self.components[k])]

    def find(self, name: str) -> list[ComponentInfo]:
        """Components called ``name`` of any kind; ``kind:name`` selects one kind."""
        if ":" in name:
            kind, _, bare = name.partition(":")
            return [self.get(kind, bare)]
        return [self.components[k][name] for k in KINDS if name in self.components[k]]


def _plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _import_path(path: Path) -> ModuleType:
    """Import a ``.py`` file or a package folder that is not installed."""
    path = path.resolve()
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise ImportError(f"the folder {path} is not a package: it has no __init__.py; pass one of its .py files "
                              "with --plugin, or add an __init__.py that imports the hook functions")
        parent, name = str(path.parent), path.name
        if parent not in sys.path:
            sys.path.insert(0, parent)
        module = importlib.import_module(name)
        origin = Path(getattr(module, "__file__", "") or "").resolve().parent
        if origin != path:
            raise ImportError(
                f"the package folder {path} is imported as {name!r}, but a module of that name is already "
                f"loaded from {origin}; rename the folder"
            )
        return module
    module_name = f"psmsearch_local_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        del sys.modules[module_name]
        sibling = _sibling_module(path, err.name)
        if sibling is not None:
            raise ModuleNotFoundError(
                f"{err}{_where(err)}: {sibling.name} sits beside the plugin, but a plugin file is loaded alone (and shipped "
                f"alone to Ray workers); make the folder {path.parent} a package (an __init__.py that imports the "
                f"hooks, with `from . import {err.name}` in the plugin) and pass the folder to --plugin",
                name=err.name) from err
        raise
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _sibling_module(path: Path, missing: str | None) -> Path | None:
    """The file or package beside plugin ``path`` that a failed ``import missing`` meant, if there is one."""
    if not missing:
        return None
    top = missing.split(".")[0]
    for candidate in (path.parent / f"{top}.py", path.parent / top):
        if candidate.exists():
            return candidate
    return None


def _where(err: BaseException) -> str:
    """`` (at FILE:LINE)`` of the innermost frame of ``err`` outside the import machinery and pluggy, or ``""``.

    A plugin failure then points at the plugin's own line, not only at the error's type.
    """
    if isinstance(err, SyntaxError) and err.filename:
        return f" (at {err.filename}:{err.lineno})"
    frames = [frame for frame in traceback.extract_tb(err.__traceback__)
              if not frame.filename.startswith("<") and not frame.filename.startswith(_PACKAGE_DIR)
              and f"{os.sep}importlib{os.sep}" not in frame.filename and f"{os.sep}pluggy{os.sep}" not in frame.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _defined_at(obj: Any) -> str:
    """`` (at FILE:LINE)`` where a plugin's class or function is defined, or ``""`` if Python cannot tell."""
    try:
        return f" (at {inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]})"
    except (TypeError, OSError):
        return ""


# psmsearch's own frames are skipped when locating a plugin failure (a HyperParameter raising in
# components.py was made on the plugin's line); the built-in plugins live elsewhere (plugins/).
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or Path(spec).exists()


def env_plugin_specs() -> list[str]:
    """Plugin specs named by ``PSMSEARCH_PLUGINS``: comma-separated, blanks ignored.

    Only commas separate: a path may hold a colon (``runs/2026-11-29T17:38/agg.py``), and ``--plugin``
    paths travel through this variable too. A missing path that looks like ``a.py:b.py`` gets a hint
    (:meth:`_Loader.add_spec`). Paths are made absolute here, against the working directory, so that
    what a run records (its plugins' tags, ``plugins --json``) names the file that was loaded.
    """
    specs = [s.strip() for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    return [str(Path(s).expanduser().resolve()) if _looks_like_path(s) else s for s in specs]


class _Loader:
    """Loads plugin modules into a pluggy manager, recording failures instead of raising."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.manager = _plugin_manager()
        self.trusted: set[str] = set()
        self.sources: dict[str, str] = {}  # plugin label -> PluginFailure.source

    def record(self, label: str, error: str, detail: str = "") -> None:
        """Record a failure of the plugin loaded under ``label``, with how it came to be loaded."""
        source = "built-in" if label in self.trusted else self.sources.get(label, "named")
        self.registry.failures.append(PluginFailure(label, error, detail, source))

    def add_module(self, label: str, load: Callable[[], Any], source: str = "named") -> None:
        if source == "named" or label not in self.sources:  # a plugin the user named is theirs, whatever else shares its label
            self.sources[label] = source
        try:
            module = load()
        except BaseException as err:  # noqa: BLE001 - a broken plugin must not stop the others
            if isinstance(err, KeyboardInterrupt):
                raise
            self.fail(label, err)
            return
        if self.manager.is_registered(module):
            return
        try:
            self.manager.register(module, name=label)
        except pluggy.PluginValidationError as err:  # a hook declared with other arguments than the spec's
            hook = next((name for name in HOOK_NAMES if f"hook {name!r}" in str(err)), "the hook")
            function = getattr(module, hook, None)
            self.record(
                label, f"{' '.join(str(err).split())}; a hook takes one argument: define it as {hook}(register)"
                f"{_defined_at(function)}")
            return
        except Exception as err:  # noqa: BLE001
            self.fail(label, err)
            return
        self.registry.plugins.append(label)

    def fail(self, label: str, err: BaseException, prefix: str = "") -> None:
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        message = f"{prefix}{type(err).__name__}: {err}{_where(err)}"
        self.record(label, message, detail)

    def check_hooks(self) -> None:
        """Report hook functions that would silently do nothing: a name that is not one of our hooks
        (``register_aggregator``), a hook function without ``@hookimpl``, and a plugin that defines
        no hook at all. Built-in plugins are trusted."""
        misnamed: set[str] = set()
        for name, caller in vars(self.manager.hook).items():
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                misnamed.add(impl.plugin_name)
                close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                code = getattr(impl.function, "__code__", None)
                where = f" (line {code.co_firstlineno})" if code is not None else ""
                self.record(
                    impl.plugin_name, f"{name}{where} is not a psmsearch hook{hint} (hooks: {', '.join(HOOK_NAMES)})")
        for label, module in self.manager.list_name_plugin():
            if label in self.trusted or module is None:
                continue
            unmarked = [hook for hook in HOOK_NAMES if callable(getattr(module, hook, None))
                        and not hasattr(getattr(module, hook), f"{PROJECT}_impl")]
            for hook in unmarked:
                self.record(
                    label, f"{hook} is not marked with @psmsearch.hookimpl, so it is never called "
                    f"(put @psmsearch.hookimpl on the line above its def){_defined_at(getattr(module, hook))}")
            if label in misnamed or unmarked:
                continue
            if not any(caller.has_spec() for caller in self.manager.get_hookcallers(module) or ()):
                self.record(
                    label, f"defines no psmsearch hook, so it registers nothing (expected functions such as "
                    f"register_aggregators(register) marked with @psmsearch.hookimpl; hooks: {', '.join(HOOK_NAMES)})")

    def add_spec(self, spec: str) -> None:
        if _looks_like_path(spec):
            path = Path(spec).expanduser()
            if not path.exists():
                parts = spec.split(os.pathsep)
                hint = (f"; plugins are separated by commas: {','.join(parts)}"
                        if len(parts) > 1 and all(Path(p).expanduser().exists() for p in parts) else "")
                self.fail(spec, FileNotFoundError(f"no such plugin file or folder: {path}{hint}"))
                return
            self.registry.local_plugins.append(str(path.resolve()))
            digest = plugin_digest(str(path))  # read as it is imported: the code this process runs
            self.add_module(str(path), lambda: _import_path(path))
            label = str(path)
        else:
            self.registry.local_plugins.append(spec)
            digest = module_digest(spec)
            self.add_module(spec, lambda: importlib.import_module(spec))
            label = spec
        if digest is not None and label in self.registry.plugins:
            self.registry.plugin_digests[label] = digest

    def collect(self) -> None:
        """Call every plugin's hooks, plugins in the order they were loaded (built-ins, installed
        packages, named plugins), so that a name registered twice stays with the first to load.
        pluggy's own order puts ``trylast`` implementations first: an installed package marked so
        took ``attention`` from the built-ins, which were then blamed for registering it twice."""
        loaded = {label: index for index, label in enumerate(self.registry.plugins)}
        for kind in KINDS:
            hook = getattr(self.manager.hook, HOOK_FOR_KIND[kind])
            for impl in sorted(hook.get_hookimpls(), key=lambda impl: loaded.get(impl.plugin_name, len(loaded))):
                if "register" not in impl.argnames:
                    self.record(
                        impl.plugin_name, f"{HOOK_FOR_KIND[kind]}() takes no register argument, so it cannot register "
                        f"anything: define it as {HOOK_FOR_KIND[kind]}(register){_defined_at(impl.function)}")
                    continue
                callback = self._register_callback(kind, impl.plugin_name)
                try:
                    impl.function(register=callback)
                except Exception as err:  # noqa: BLE001
                    self.fail(impl.plugin_name, err)

    def _register_callback(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(cls: type, name: str | None = None) -> None:
            caller = sys._getframe(1)  # the plugin's register(...) line: where a thing that is no class was given
            call_site = f" (at {caller.f_code.co_filename}:{caller.f_lineno})"
            try:
                info = _describe(kind, cls, plugin, name)
            except PluginError as err:  # located at the declaration it names, else at the class, else the call
                location = getattr(err, "location", "") or (_defined_at(cls) if isinstance(cls, type) else "") or call_site
                self.record(plugin, f"{err}{location}")
                return
            except Exception as err:  # noqa: BLE001 - one bad class must not cost the plugin's others
                label = getattr(cls, "__name__", repr(cls))
                self.fail(plugin, err, prefix=f"registering {kind} class {label}: ")
                return
            existing = self.registry.components[kind].get(info.name)
            if existing is not None:
                self.record(plugin, f"{kind} {info.name!r} is registered twice: by plugin {existing.plugin!r}"
                                    f"{_defined_at(existing.cls)} and by plugin {plugin!r}{_defined_at(cls)}; keeping "
                                    f"the one from {existing.plugin!r}")
                return
            self.registry.components[kind][info.name] = info

        return register


# What a component class must define itself: the base class's version only raises NotImplementedError,
# so a class without it would register, list and build, and fail every trial that uses it.
REQUIRED_METHODS: dict[str, tuple[tuple[str, str], ...]] = {
    "encoder": (("features", "features(x, offset)"), ("summarize", "summarize(f)"), ("state_shape", "state_shape")),
    "aggregator": (("forward", "forward(older, newer)"), ("initial_state", "initial_state(batch_shape)")),
    "head": (("forward", "forward(prefix, f)"),),
    "task": (("vocab_size", "vocab_size"), ("train_batch", "train_batch(step, batch_size, generator)"),
             ("evaluate", "evaluate(model, device, batch_size)"), ("metric_directions", "metric_directions()")),
}

# Names a hyperparameter (or a task's option) may not take, each with why it could never be set: a
# config writes ``name`` and ``params`` beside them (and a space ``search: all``), a component is built
# as ``cls(context, **hyperparameters)`` and a task as ``Task(seed=..., **params)``.
RESERVED_HYPERPARAMETERS: dict[str, dict[str, str]] = {
    "component": {"name": "a config writes the component's name there", "params": "a config nests them under params",
                  "search": "a space writes search: all beside them",
                  "context": "a component is built as cls(context, **hyperparameters)"},
    "task": {"name": "a config writes the task's name there", "params": "a config nests them under params",
             "seed": "a task is built as Task(seed=..., **params), with the trial's seed"},
}


def _describe(kind: str, cls: type, plugin: str, name: str | None) -> ComponentInfo:
    """Validate a registered class and describe it, or raise a PluginError saying what is wrong."""
    if kind in COMPONENT_KINDS:
        base = COMPONENT_KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"register_{kind}s registered {cls!r}, which is not a subclass of psmsearch.{base.__name__}")
    else:
        from psmsearch.tasks import Task

        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise PluginError(f"register_tasks registered {cls!r}, which is not a subclass of psmsearch.tasks.Task")
    name = name or getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise PluginError(f"{kind} class {cls.__name__} has no name (set the class attribute `name`)")
    hyperparameters = _declared_hyperparameters(kind, name, getattr(cls, "hyperparameters", ()))
    state_kind = getattr(cls, "state_kind", None) if kind in COMPONENT_KINDS else None
    if kind in COMPONENT_KINDS and not state_kind:
        raise PluginError(f"{kind} {name!r} declares no state_kind")
    from psmsearch.tasks import Task

    base = COMPONENT_KINDS.get(kind, Task)
    missing = [signature for method, signature in REQUIRED_METHODS[kind]
               if getattr(cls, method, None) is getattr(base, method)]
    if missing:
        where = f"psmsearch.{base.__name__}" if kind in COMPONENT_KINDS else "psmsearch.tasks.Task"
        raise PluginError(f"{kind} {name!r} does not define {' or '.join(missing)}, which every {kind} must "
                          f"(see the docstring of {where})")
    if kind == "task":
        for option in getattr(cls, "options", {}) or {}:
            reason = RESERVED_HYPERPARAMETERS["task"].get(option)
            if reason:
                raise PluginError(f"task {name!r}: option {option!r} has a reserved name ({reason}), so it could "
                                  "never be set; rename it")
    associative = bool(getattr(cls, "associative", False)) if kind == "aggregator" else None
    doc = (getattr(cls, "description", "") or (cls.__doc__ or "")).strip().splitlines()
    return ComponentInfo(name, kind, plugin, cls, state_kind, associative, hyperparameters, doc[0] if doc else "")


def _declared_hyperparameters(kind: str, name: str, declared: Any) -> tuple[HyperParameter, ...]:
    """A component's ``hyperparameters`` as a tuple, or a PluginError naming what is wrong with them."""
    expected = "a sequence of psmsearch.HyperParameter"
    if isinstance(declared, HyperParameter):
        raise PluginError(f"{kind} {name!r}: hyperparameters must be {expected}, got a single HyperParameter "
                          "(a one-element tuple needs a trailing comma: (HyperParameter(...),))")
    if isinstance(declared, (str, bytes, dict)):
        raise PluginError(f"{kind} {name!r}: hyperparameters must be {expected}, got a {type(declared).__name__}")
    try:
        hyperparameters = tuple(declared)
    except TypeError:
        raise PluginError(f"{kind} {name!r}: hyperparameters must be {expected}, got "
                          f"{type(declared).__name__}") from None
    seen: set[str] = set()
    for hp in hyperparameters:
        if not isinstance(hp, HyperParameter):
            raise PluginError(f"{kind} {name!r}: hyperparameters must be {expected}, got an element {hp!r}")
        problems = hp.declaration_problems()
        if problems:
            error = PluginError(f"{kind} {name!r}: hyperparameter {hp.name!r}: {'; '.join(problems)}")
            error.location = f" (at {hp.origin[0]}:{hp.origin[1]})" if hp.origin else ""
            raise error
        if hp.name in seen:
            raise PluginError(f"{kind} {name!r}: hyperparameter {hp.name!r} is declared twice")
        reason = RESERVED_HYPERPARAMETERS["task" if kind == "task" else "component"].get(hp.name)
        if reason:
            error = PluginError(f"{kind} {name!r}: hyperparameter {hp.name!r} has a reserved name ({reason}), so "
                                "it could never be set; rename it")
            error.location = f" (at {hp.origin[0]}:{hp.origin[1]})" if hp.origin else ""
            raise error
        seen.add(hp.name)
    return hyperparameters


def load_registry(extra_plugins: Sequence[str] = (), defaults: Iterable[str] = DEFAULT_PLUGINS) -> Registry:
    """Build a fresh registry from all plugin sources (never raises for a broken plugin)."""
    registry = Registry()
    loader = _Loader(registry)
    for module_name in defaults:
        loader.trusted.add(module_name)
        loader.add_module(module_name, lambda m=module_name: importlib.import_module(m))
    installed = list(importlib.metadata.entry_points(group=PROJECT))
    names = Counter(entry_point.name for entry_point in installed)
    for entry_point in installed:
        dist = entry_point.dist
        # two packages' entry points of one name would share a label, and pluggy keeps only the first
        label = f"{dist.name}:{entry_point.name}" if names[entry_point.name] > 1 and dist is not None else entry_point.name
        loader.add_module(label, entry_point.load, source="installed")
        if label in registry.plugins:
            if dist is not None:
                registry.distributions[label] = f"{dist.name}=={dist.version}"
            digest = module_digest(entry_point.module)
            if digest is not None:
                registry.plugin_digests[label] = digest
    for spec in [*env_plugin_specs(), *extra_plugins]:
        loader.add_spec(spec)
    loader.check_hooks()
    loader.collect()
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use (respects ``PSMSEARCH_PLUGINS``)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def use_plugins(specs: Sequence[str]) -> Registry:
    """Add plugin paths/modules for this process and its children, and reload the registry.

    Paths are made absolute and appended to ``PSMSEARCH_PLUGINS`` so that subprocesses and Ray
    workers load the same plugins.
    """
    resolved = [str(Path(s).expanduser().resolve()) if _looks_like_path(s) else s for s in specs]
    current = env_plugin_specs()
    os.environ[ENV_VAR] = ",".join(dict.fromkeys([*current, *resolved]))
    return reset_registry()


def reset_registry() -> Registry:
    """Reload the process-wide registry (after installing a plugin or changing the environment)."""
    global _REGISTRY
    _REGISTRY = load_registry()
    return _REGISTRY


def require_loaded_plugins(command: str, registry: Registry | None = None,
                           warn: Callable[[str], None] | None = None) -> Registry:
    """The registry, or a :class:`PluginError` if a plugin this run was told to load failed to.

    A plugin named for the run (``--plugin``, ``PSMSEARCH_PLUGINS``) or a built-in that failed stops
    ``search`` and ``train`` before anything runs: it was named to be used, and a search without its
    components, or with a built-in standing in for a name it meant to take, would spend its budget on
    something else. An installed package's plugin loads in every run, named or not; its failure goes
    to ``warn`` (one line each) and the run goes on, so that one broken package does not take the
    tool down (DESIGN.md §5). A component it would have registered is then unknown, and that error
    names the plugins that failed (:meth:`Registry.get`); a name it registered a second time stays
    with its first registration, as the warning says and each trial's plugin tag records.
    ``plugins`` and ``check`` run whatever failed and report every failure.
    """
    registry = registry or get_registry()
    blocking = [failure for failure in registry.failures if failure.source != "installed"]
    if blocking:
        listed = "; ".join(str(failure) for failure in blocking)
        count = len({failure.plugin for failure in blocking})
        problems = len(blocking)
        counted = f" ({problems} problems)" if problems > count else ""
        raise PluginError(
            f"{count} plugin{'s' if count > 1 else ''} failed to load{counted}, so {command} would run without "
            f"{'their' if count > 1 else 'its'} components (or with a built-in of the same name): {listed}. "
            "Fix the plugin, or leave it out (--plugin, PSMSEARCH_PLUGINS, or its installed package); "
            "`psmsearch plugins` shows what loaded"
        )
    for failure in registry.failures:
        if warn is not None:
            warn(f"{failure} ({command} goes on without it; `psmsearch plugins` shows what loaded)")
    return registry
