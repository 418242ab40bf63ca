"""The ``psmsearch`` command line: plugins, check, train, search, compare.

Errors caused by the user's input (:class:`psmsearch.errors.PSMSearchError`) are printed as one
clear message and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from psmsearch import interrupts
from psmsearch.cli_search import compare, search
from psmsearch.cli_train import train
from psmsearch.errors import PSMSearchError
from psmsearch.registry import Registry, get_registry, use_plugins
from psmsearch.tasks import LAUNCH_DIR_ENV

if TYPE_CHECKING:
    from psmsearch.testing import CheckResult

err_console = Console(stderr=True, soft_wrap=True)  # an error or warning is one line however long: never cut at 80 columns


class _Group(click.Group):
    """Turns PSMSearchError into exit code 2 with a one-line message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as err:
            if err.option_name == "--plugin" and ctx.invoked_subcommand:
                err.message += (f" --plugin is an option of psmsearch itself and goes before the command: "
                                f"psmsearch --plugin PATH {ctx.invoked_subcommand} ...")
            raise
        except PSMSearchError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="PATH",
    help="Load a plugin module (.py file, package folder or module name); repeatable. "
    "Also shipped to subprocesses and Ray workers.",
)
@click.version_option(package_name="psmsearch")
def main(plugins: Sequence[str]) -> None:
    """Search the design space of Prefix-Scannable Models."""
    interrupts.install()  # SIGTERM (what schedulers send) stops a command as Ctrl-C does, threads included
    os.environ[LAUNCH_DIR_ENV] = os.getcwd()  # relative data paths mean the same in every worker
    if plugins:
        use_plugins(plugins)


def report_plugin_failures(registry: Registry) -> None:
    """Print each plugin that failed to load (the rest of the tool keeps working)."""
    for failure in registry.failures:
        err_console.print(f"[yellow]warning:[/] {escape(str(failure))}", highlight=False, soft_wrap=True)


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"components": [...], "failures": [...]} as JSON instead of a table.')
def plugins_command(as_json: bool) -> None:
    """List registered components and tasks, and plugins that failed to load.

    Failures also go to stderr, and in ``--json`` under ``"failures"`` (plugin, error, detail) so a
    script sees a broken plugin without parsing warnings. The exit code is 0 either way: listing
    worked; ``psmsearch check`` is the command that fails on them.
    """
    registry = get_registry()
    report_plugin_failures(registry)
    rows = [info.as_dict() for info in registry.all()]
    if as_json:
        listing = {"components": rows, "failures": [failure.as_dict() for failure in registry.failures]}
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    table = Table(title="psmsearch components")
    for column in ("kind", "name", "plugin", "state_kind", "associative", "hyperparameters"):
        table.add_column(column)
    for row in rows:
        settings = [_describe_param(p) for p in row["hyperparameters"]]
        settings += [f"{name}={default} (option)" for name, default in row["options"].items()]
        params = ", ".join(settings) or "-"
        assoc = "-" if row["associative"] is None else ("yes" if row["associative"] else "no")
        table.add_row(row["kind"], row["name"], row["plugin"], row["state_kind"] or "-", assoc, params)
    print_table(table)


def print_table(table: Table) -> None:
    """Print ``table`` on stdout at the terminal's width, or piped at ``COLUMNS`` when that is set.

    Piped without ``COLUMNS``, rich would assume 80 columns and cut cells; there the table gets 120
    columns, or more where its longest words need them. At any width the widest columns are
    narrowed first, each only down to its longest word, so text wraps between words inside its
    cell; where even the longest words do not fit (a narrow terminal), they fold onto the next line
    of their cell instead of ending in an ellipsis. No cell is cut: at a width too small for about
    8 characters a column, the table is printed wider than asked.
    """
    console = Console()
    wide = Console(width=100_000)
    spans = [_content_widths(wide, column) for column in table.columns]
    whole = wide.measure(table)
    fixed = console.is_terminal or os.environ.get("COLUMNS", "").isdigit()  # rich takes COLUMNS when it is digits
    width = console.width if fixed else max(120, whole.minimum)
    budget = width - (whole.maximum - sum(widest for _, widest in spans))  # less borders and padding
    caps = [widest for _, widest in spans]
    floors = ([word for word, _ in spans], [min(word, _NARROWEST) for word, _ in spans])
    for floor in floors:  # first down to each column's longest word, then, only if need be, below it
        while sum(caps) > budget:
            narrowable = [i for i, cap in enumerate(caps) if cap > floor[i]]
            if not narrowable:
                break
            caps[max(narrowable, key=lambda i: caps[i])] -= 1
    for column, cap in zip(table.columns, caps):
        column.overflow = "fold"
        column.min_width = column.max_width = cap  # as planned: rich would share a shortfall out evenly
    overflow = sum(caps) - budget  # > 0 only below about 8 characters a column: wider than asked, nothing lost
    (console if fixed and overflow <= 0 else Console(width=width + max(overflow, 0))).print(table)


_NARROWEST = 8
"""Columns are narrowed below their longest word only down to this many characters (or that word)."""


def _content_widths(console: Console, column: Column) -> tuple[int, int]:
    """The width of ``column``'s longest word and of its widest cell (header included), padding excluded."""
    measured = [Measurement.get(console, console.options, cell) for cell in (column.header, *column.cells)]
    return max(m.minimum for m in measured), max(m.maximum for m in measured)


def _describe_param(param: dict[str, Any]) -> str:
    if "choices" in param:
        allowed = "|".join(str(c) for c in param["choices"])
    elif "range" in param:
        allowed = f"{param['range'][0]}..{param['range'][1]}" + (" log" if param.get("log") else "")
    else:
        allowed = param["type"]
    return f"{param['name']}={param['default']} ({allowed})"


CHECKED_KINDS = ("encoder", "aggregator", "head")


def _partners(specs: Sequence[str], registry: Any) -> dict[str, str]:
    """``--partner KIND:NAME`` options as ``{kind: name}``, each checked: a kind the suite takes, given
    once, and a registered name."""
    partners: dict[str, str] = {}
    for spec in specs:
        kind, colon, name = spec.partition(":")
        if not colon or kind not in CHECKED_KINDS or not name:
            raise click.BadParameter(f"{spec!r}: expected KIND:NAME with KIND one of {', '.join(CHECKED_KINDS)}",
                                     param_hint="--partner")
        if kind in partners:
            raise click.BadParameter(f"{kind} given twice ({partners[kind]!r} and {name!r}); one partner per kind",
                                     param_hint="--partner")
        registry.get(kind, name)  # an unknown name: the registry's error, with its suggestions
        partners[kind] = name
    return partners


@main.command("check")
@click.argument("names", nargs=-1)
@click.option("--all", "check_all", is_flag=True, help="Check every registered encoder, aggregator and head.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--traceback", "show_traceback", is_flag=True,
              help="Under a check that failed on an unexpected exception, print its full traceback.")
@click.option("--partner", "partner_specs", multiple=True, metavar="KIND:NAME",
              help="Run beside this registered component of KIND (encoder, aggregator, head) instead of the first "
                   "of the state kind; repeatable, one per kind.")
@click.option("--set", "hyperparameter_specs", multiple=True, metavar="NAME=VALUE",
              help="Check the named component at this value of one of its hyperparameters (VALUE read as YAML) "
                   "instead of its declared default; repeatable; with one component named.")
def check_command(names: Sequence[str], check_all: bool, as_json: bool, show_traceback: bool,
                  partner_specs: Sequence[str], hyperparameter_specs: Sequence[str]) -> None:
    """Run the contract suite on components (NAME or KIND:NAME); exit 0 only if all pass.

    A plugin that failed to load counts as a failed check: the component meant to be tested may be
    the one that is missing, or a built-in of the same name may be standing in for it.
    """
    from psmsearch.errors import UnknownComponentError
    from psmsearch.testing import CheckResult, check_components

    registry = get_registry()
    partners = _partners(partner_specs, registry)
    missing: list[CheckResult] = []  # named components that are not registered while a plugin failed to load
    if check_all:
        infos = [info for info in registry.all() if info.kind in ("encoder", "aggregator", "head")]
    elif names:
        infos = []
        for name in names:
            kind, colon, _ = name.partition(":")
            if colon and kind not in CHECKED_KINDS:
                raise UnknownComponentError("component kind", kind, CHECKED_KINDS) if kind != "task" else \
                    click.UsageError(f"{name!r}: tasks have no contract suite; check takes components of the kinds "
                                     f"{', '.join(CHECKED_KINDS)}")
            try:
                matches = registry.find(name)
            except UnknownComponentError:
                if registry.failures:  # most likely defined by the plugin that failed: a failed check, not a typo
                    missing.append(_not_registered(name, registry))
                    continue
                raise
            found = [i for i in matches if i.kind in CHECKED_KINDS]
            if not found and matches:
                raise click.UsageError(f"{name!r} is a task; tasks have no contract suite; check takes components "
                                       f"of the kinds {', '.join(CHECKED_KINDS)}")
            if not found:
                if registry.failures:
                    missing.append(_not_registered(name, registry))
                    continue
                known = {i.name for i in registry.all() if i.kind != "task"}
                raise UnknownComponentError("component", name, known)
            infos.extend(found)
    else:
        raise click.UsageError("name at least one component, or pass --all")
    hyperparameters = _hyperparameters(hyperparameter_specs, infos, len(missing))
    load_failures = [CheckResult(f"plugin {failure.plugin}", "load", False, failure.error)
                     for failure in registry.failures]
    results = load_failures + missing + check_components(infos, registry, partners, hyperparameters)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for result in results:
            style = "green" if result.passed else "bold red"
            Console().print(f"[{style}]{escape(result.line())}[/]", highlight=False, soft_wrap=True)
            if show_traceback and result.traceback:
                click.echo(result.traceback.rstrip("\n"))
    failed = sum(not r.passed for r in results)
    click.echo(f"{len(results) - failed} passed, {failed} failed", err=as_json)
    sys.exit(1 if failed else 0)


def _hyperparameters(specs: Sequence[str], infos: Sequence[Any], missing: int) -> dict[str, Any]:
    """``--set NAME=VALUE`` options as ``{name: value}`` (values read as YAML, as ``train --set`` reads
    them), each validated against the one component named: its declared hyperparameters and ranges.
    Where that component is ``missing`` (its plugin failed to load), the failures are what the run
    reports, and nothing is validated."""
    if not specs:
        return {}
    if len(infos) + missing != 1:
        raise click.UsageError(f"--set takes one component to check, and {len(infos) + missing} are named; name "
                               "one (as KIND:NAME where a name is registered for two kinds)")
    if missing:
        return {}
    given: dict[str, Any] = {}
    for spec in specs:
        name, equals, text = spec.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{spec!r}: expected NAME=VALUE (e.g. heads=4)", param_hint="--set")
        try:
            given[name] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise click.BadParameter(f"{spec!r}: the value is not YAML: {err}", param_hint="--set") from None
    (info,) = infos
    try:
        info.cls.resolve_hyperparameters(given)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--set") from None
    return given


def _not_registered(name: str, registry: Registry) -> CheckResult:
    """The failed check of a named component that is not registered while some plugin failed to load
    (with the closest registered names: it may be a typo all the same)."""
    from psmsearch.errors import suggest
    from psmsearch.testing import CheckResult

    plugins = ", ".join(sorted({failure.plugin for failure in registry.failures}))
    known = {info.name for info in registry.all() if info.kind in CHECKED_KINDS}
    return CheckResult(f"component {name!r}", "registered", False,
                       f"not registered; it may be defined by the plugin that failed to load ({plugins})."
                       f"{suggest(name.rpartition(':')[2], known)}")


main.add_command(train)
main.add_command(search)
main.add_command(compare)


def run() -> None:
    """Console-script entry point."""
    main()
