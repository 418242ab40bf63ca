"""Bounded text for the trials named on ``compare``'s plots.

Several trials can share one point of objectives.png or one curve of accuracy_vs_length.png (trials
at chance accuracy with the same state size, say). Their names used to be joined in full, so a label
grew with the number of trials and made ``tight_layout`` shrink the plot area (to 0.12 of the
figure's width with 10 trials on one point; from 12 on it gave up and the label ran off the
figure). Here a label line holds at most :data:`LABEL_CHARS` characters, runs of consecutive trials
read ``trials 3–9``, and a group that does not fit gets a key letter (``A: trials 3, 5, 7 (+27 more)``)
whose complete list goes in a key below the plot (:func:`key_lines`), itself bounded to
:data:`KEY_LINES` lines.

A label also says what its trials are, so that a reader need not look each one up in the table
``compare`` prints: the parameters that differ among the trials one plot shows
(:func:`trial_params`: ``trial 4: attention c=16``). Parameters every trial there shares are left
out, names are shortened (``model.chunk_size`` -> ``c``), a component's name stands alone where it
cannot be mistaken for another's (``attention``, not ``aggregator=attention``) and long values are
cut around an ellipsis. Trials of one group that differ in them are keyed, the key listing each
set of parameters with its trials as a label would (``A: trials 0, 3, 6: c=2; trials 2, 5: c=4``).
Pure text: no matplotlib here.
"""

from __future__ import annotations

import re
import string
import textwrap
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

LABEL_CHARS = 32  # longest line of a label on a point or legend entry, key letter included
LABEL_LINES = 2  # a label's lines: its trials, then their parameters where one line cannot hold both
NAME_CHARS = 16  # longest single trial name (a run id or a name without a trial number is cut)
VALUE_CHARS = 16  # longest parameter value on a plot (a longer one keeps its start and end)
KEY_LINES = 6  # most lines of the key under a plot
KEY_INDENT = 4  # most indent of a key entry's continuation lines
MIN_LIST_CHARS = 20  # room a key entry keeps for a list of trials (``trials 0 (+99 more)``)
ELLIPSIS = "…"
KEEP = "\u00a0"  # joins the words of a key's parameters while it is wrapped, so that no line break splits them
TRIAL_NAME = re.compile(r"trial-(\d+)$")
NAME_PARAMS = ("kind", "task", "encoder", "aggregator", "head")  # whose values are names that can stand alone
SHORT_PARAMS = {"chunk_size": "c", "d_model": "d", "n_layers": "layers", "n_heads": "heads", "batch_size": "batch",
                "warmup_steps": "warmup", "weight_decay": "wd", "learning_rate": "lr"}


@dataclass(frozen=True)
class KeyEntry:
    """One entry of the key under a plot: ``heading`` (a key letter, or what its trials have in
    common there: ``no room for their labels``), the trials' names and ``params``, each one's
    parameters that tell it apart from the plot's other trials (:func:`trial_params`; a name missing
    or empty where none do)."""

    heading: str
    names: tuple[str, ...]
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupLabel:
    """What a plot writes for one group of trials (run names) drawn on one spot: ``text``, at most
    :data:`LABEL_LINES` lines of :data:`LABEL_CHARS` characters; ``key``, the letter the key under
    the plot lists the whole group by (empty where ``text`` names every trial); ``entry``, what the
    key says of the group (None where ``text`` says it all: every trial and its parameters)."""

    text: str
    names: tuple[str, ...]
    key: str = ""
    entry: KeyEntry | None = None


def short_name(name: str) -> str:
    """``quick-s3-trial-4`` -> ``trial 4``; another name cut to :data:`NAME_CHARS` characters."""
    match = TRIAL_NAME.search(name)
    if match:
        return f"trial {int(match.group(1))}"
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + ELLIPSIS


def _number_runs(numbers: Sequence[int]) -> list[tuple[str, int]]:
    """Sorted distinct numbers as ``(text, count)`` items: a run of three or more reads ``3–7``."""
    items: list[tuple[str, int]] = []
    ordered = sorted(set(numbers))
    start = 0
    for end in range(1, len(ordered) + 1):
        if end == len(ordered) or ordered[end] != ordered[end - 1] + 1:
            run = ordered[start:end]
            items += [(f"{run[0]}–{run[-1]}", len(run))] if len(run) >= 3 else [(str(n), 1) for n in run]
            start = end
    return items


def _items(names: Sequence[str]) -> tuple[str, list[tuple[str, int]]]:
    """A group's names as a prefix and ``(text, trials covered)`` items: ``trials`` and number runs
    when every name is a trial's, else each name, shortened, with no prefix."""
    numbers = [TRIAL_NAME.search(name) for name in names]
    if all(numbers):
        items = _number_runs([int(match.group(1)) for match in numbers if match])
        single = len(items) == 1 and items[0][1] == 1
        return ("trial " if single else "trials "), items
    return "", [(short_name(name), 1) for name in names]


def trial_list(names: Sequence[str], limit: int) -> str:
    """The trials named ``names`` in at most ``limit`` characters: all of them (``trials 0, 2, 5–9``)
    when they fit, else as many leading ones as fit with ``(+N more)`` after them (N trials)."""
    prefix, items = _items(names)
    full = prefix + ", ".join(text for text, _ in items)
    if len(full) <= limit:
        return full
    total = sum(count for _, count in items)
    shown: list[str] = []
    covered = 0
    for text, count in items:
        if shown and len(f"{prefix}{', '.join([*shown, text])} (+{total - covered - count} more)") > limit:
            break
        shown.append(text)
        covered += count
    label = f"{prefix}{', '.join(shown)} (+{total - covered} more)"
    return label if len(label) <= limit else label[: limit - 1] + ELLIPSIS


def cut_middle(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, its middle replaced by an ellipsis where it is longer:
    the ends of a value are what tell it apart (``linear_r…ut_diag`` and ``linear_r…t_dense``)."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return text[:head] + ELLIPSIS + text[len(text) - (limit - 1 - head):]


def cut_words(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: its leading words and `` …`` where it is longer (the
    first word cut short where even it does not fit)."""
    if len(text) <= limit:
        return text
    words = text.split(" ")
    kept = next((n for n in range(len(words) - 1, 0, -1) if len(" ".join(words[:n])) + 2 <= limit), 0)
    return " ".join(words[:kept]) + " " + ELLIPSIS if kept else text[: limit - 1] + ELLIPSIS


def trial_params(params: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """For each trial (name -> its parameters, values as the table shows them), the parameters that
    tell it apart from the other trials given, as a plot writes them: ``attention c=16``, ``gpt``.

    A parameter every trial has with one value is left out (one a trial lacks, as a GPT lacks a chunk
    size, differs). Names are shortened (:func:`short_keys`); a component's name stands alone where no
    other component shown takes that name too (:func:`_bare_keys`); values are cut to
    :data:`VALUE_CHARS`. Components come first (kind, task, encoder, aggregator, head), then the
    others by name."""
    keys = _varying_keys(params)
    short = short_keys(keys)
    bare = _bare_keys(keys, params)
    limits = {key: _distinct_cut_limit({values[key] for values in params.values() if key in values}) for key in keys}
    return {trial: " ".join(_param_text(short[key], cut_middle(values[key], limits[key]), key in bare)
                            for key in keys if key in values)
            for trial, values in params.items()}


def _distinct_cut_limit(values: set[str]) -> int:
    """The fewest characters, :data:`VALUE_CHARS` at least, to which :func:`cut_middle` cuts ``values``
    and keeps them apart: ``/data/wikitext-2/wiki.train.tokens`` and ``…-103/…`` differ only in their
    middle, and cut alike they labelled two trials as sharing one value the table shows as two."""
    limit = VALUE_CHARS
    longest = max(map(len, values), default=0)
    while limit < longest and len({cut_middle(value, limit) for value in values}) < len(values):
        limit += 1
    return limit


def _param_text(name: str, value: str, bare: bool) -> str:
    """One parameter as a label shows it: ``c=16``, or the value alone (``attention``)."""
    return value if bare else f"{name}={value}"


def _varying_keys(params: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The parameters whose value (or absence) is not the same for every trial, components first."""
    keys = {key for values in params.values() for key in values}
    varying = [key for key in keys if len({values.get(key) for values in params.values()}) > 1]
    return sorted(varying, key=lambda key: (_name_rank(key), key))


def _name_rank(key: str) -> int:
    """A component parameter's place in :data:`NAME_PARAMS`; past them for any other parameter."""
    base = key.rsplit(".", 1)[-1].split("-", 1)[0]
    return NAME_PARAMS.index(base) if base in NAME_PARAMS else len(NAME_PARAMS)


def _bare_keys(keys: Sequence[str], params: Mapping[str, Mapping[str, str]]) -> set[str]:
    """The component parameters among ``keys`` whose values no other component parameter among
    ``keys`` takes: ``attention`` alone names the aggregator unless the head may be ``attention`` too."""
    names = [key for key in keys if _name_rank(key) < len(NAME_PARAMS)]
    taken = {key: {values[key] for values in params.values() if key in values} for key in names}
    return {key for key in names if not any(taken[key] & taken[other] for other in names if other != key)}


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """A short, distinct name for each parameter path: its last part, abbreviated where common
    (:data:`SHORT_PARAMS`: ``model.chunk_size`` -> ``c``). Paths whose names coincide take their next
    candidate name (:func:`_key_names`) until none do: ``model.n_layers`` beside
    ``model.aggregator.attention.layers`` and ``model.head.attention.layers`` reads ``n_layers``
    beside ``aggregator.layers`` and ``head.layers``."""
    candidates = {key: _key_names(key) for key in keys}
    levels = dict.fromkeys(keys, 0)
    while True:
        names = {key: candidates[key][min(levels[key], len(candidates[key]) - 1)] for key in keys}
        clashing = [key for key in keys if list(names.values()).count(names[key]) > 1]
        if not clashing:
            return names
        for key in clashing:
            levels[key] += 1


def _key_names(key: str) -> list[str]:
    """The names a parameter path may go by, shortest first: its last part abbreviated, as it is,
    with one part before it, nearest first (``attention.layers``, ``aggregator.layers``), and the whole
    path, which no other path shares."""
    *parents, last = key.split(".")
    names = [SHORT_PARAMS.get(last, last), last, *(f"{parent}.{last}" for parent in reversed(parents)), key]
    return list(dict.fromkeys(names))


def group_label(names: Sequence[str], key: str, limit: int = LABEL_CHARS, params: Mapping[str, str] | None = None,
                lines: int = LABEL_LINES) -> GroupLabel:
    """The bounded label of one group: its trials and the parameters they share (``params``: name ->
    :func:`trial_params` text), on one line (``trials 0, 2: mlp c=4``) or, with ``lines`` of 2, on two;
    as many trials as ``lines`` that differ in them, a line each. Where only the parameters do not
    fit, they are cut (``trial 6: psm pool …``) and ``entry`` gives them whole (the key line ``trial 6:
    psm pool aggregator=affine_dense c=2``). Where the trials do not fit, or differ in their
    parameters, ``key`` is taken (``A: trials 3, 5 (+27 more)``, their shared parameters cut on a
    second line) and ``entry`` lists the group under it."""
    params = params or {}
    texts = list(dict.fromkeys(params.get(name, "") for name in names))
    shared = texts[0] if len(texts) == 1 else None
    entry = KeyEntry(key, tuple(names), {name: params.get(name, "") for name in names})
    trials = trial_list(names, 10**9)
    if shared is not None:
        whole = _fitting(trials, shared, limit, lines)
        if whole:
            return GroupLabel(whole, tuple(names))
        cut = _cut_params(trials, shared, limit, lines)
        if cut:
            return GroupLabel(cut, tuple(names), "", replace(entry, heading=""))
    elif each := _line_per_trial(names, params, limit, lines):
        return GroupLabel(each, tuple(names))
    text = f"{key}: {trial_list(names, limit - len(key) - 2)}"
    if shared and lines > 1:
        text += "\n" + cut_words(shared, limit)
    return GroupLabel(text, tuple(names), key, entry)


def _fitting(trials: str, params: str, limit: int, lines: int) -> str:
    """``trials: params`` where that fits ``limit``, else ``trials`` over ``params`` where ``lines``
    allows two and each fits; empty where neither does."""
    layouts = [f"{trials}: {params}" if params else trials] + ([f"{trials}\n{params}"] if params and lines > 1 else [])
    return next((text for text in layouts if _fits(text, limit)), "")


def _fits(text: str, limit: int) -> bool:
    """Whether every line of ``text`` holds ``limit`` characters at most."""
    return all(len(line) <= limit for line in text.split("\n"))


def _line_per_trial(names: Sequence[str], params: Mapping[str, str], limit: int, lines: int) -> str:
    """``trial 17: c=4`` over ``trial 37: c=3``: a few trials that differ in their parameters, a line
    each, where they fit ``lines`` lines of ``limit``; empty where they do not."""
    if len(names) > lines:
        return ""
    text = "\n".join(f"{short_name(name)}: {params[name]}" if params.get(name) else short_name(name) for name in names)
    return text if _fits(text, limit) else ""


def _cut_params(trials: str, params: str, limit: int, lines: int) -> str:
    """``trials`` in full with ``params`` cut to fit ``limit``: on a line of their own where ``lines``
    allows two, else beside a list of trials taking half the line at most; empty where that fails."""
    if lines > 1 and len(trials) <= limit:
        return f"{trials}\n{cut_words(params, limit)}"
    if len(trials) <= limit // 2:
        return f"{trials}: {cut_words(params, limit - len(trials) - 2)}"
    return ""


def group_labels(groups: Sequence[Sequence[str]], limit: int = LABEL_CHARS, params: Mapping[str, str] | None = None,
                 lines: int = LABEL_LINES) -> list[GroupLabel]:
    """One bounded label per group of trial names, key letters given in order to those that need one."""
    labels: list[GroupLabel] = []
    for names in groups:
        labels.append(group_label(names, key_letter(sum(bool(label.key) for label in labels)), limit, params, lines))
    return labels


def key_letter(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: keys that cannot be read as trial numbers."""
    letters = string.ascii_uppercase
    return key_letter(index // 26 - 1) + letters[index % 26] if index >= 26 else letters[index]


def key_lines(entries: Sequence[KeyEntry], width: int, max_lines: int = KEY_LINES) -> list[str]:
    """The key under a plot: for each entry, ``heading: trials ...``, or with parameters
    ``heading: trials 0, 3: c=2; trial 2: c=4`` (its trials grouped by their parameters, in the order
    they come), wrapped to ``width`` characters. The entries share ``max_lines`` lines: each gets one,
    then those needing more one more in turn while lines are left (:func:`_shares`), and each says
    ``(+N more)`` where its trials do not fit its lines; entries past
    ``max_lines`` are counted in a last line that sends the reader to the table ``psmsearch compare``
    prints. Entries with a heading come first: the plot names their trials by it alone, where an
    entry without one completes a label's cut parameters."""
    if not entries:
        return []
    entries = sorted(entries, key=lambda entry: not entry.heading)
    shown = entries if len(entries) <= max_lines else entries[: max_lines - 1]
    needs = [len(_key_entry(entry, width, 10**6)) for entry in shown]
    shares = _shares(needs, max_lines - (len(shown) < len(entries)))
    lines = [line for entry, share in zip(shown, shares) for line in _key_entry(entry, width, share)]
    if len(shown) < len(entries):
        lines.append(f"… {len(entries) - len(shown)} more: the table psmsearch compare prints lists every trial")
    return lines


def _shares(needs: Sequence[int], total: int) -> list[int]:
    """Lines for entries needing ``needs`` lines out of ``total``: one each, then one more at a time,
    in turn, to those needing more, as long as lines are left."""
    shares = [1] * len(needs)
    spare = total - len(needs)
    while spare > 0 and any(share < need for share, need in zip(shares, needs)):
        for index, need in enumerate(needs):
            if shares[index] < need and spare > 0:
                shares[index] += 1
                spare -= 1
    return shares


def _by_params(entry: KeyEntry) -> list[tuple[list[str], str]]:
    """An entry's trials grouped by their parameters text, in the order they come."""
    grouped: dict[str, list[str]] = {}
    for name in entry.names:
        grouped.setdefault(entry.params.get(name, ""), []).append(name)
    return [(names, text) for text, names in grouped.items()]


def _key_entry(entry: KeyEntry, width: int, max_lines: int) -> list[str]:
    """One key entry wrapped to ``width`` in at most ``max_lines`` lines: every group of its trials
    with each list as long as fits; where even lists of :data:`MIN_LIST_CHARS` do not, the leading
    groups that fit and ``(+N more)`` for the trials of the others; where even one does not (its
    parameters too long), its last line ends with an ellipsis."""
    indent = " " * min(len(entry.heading) + 2 if entry.heading else KEY_INDENT, KEY_INDENT)
    line = width - len(indent)
    room = max_lines * line - MIN_LIST_CHARS - 2  # for one group's parameters
    groups = _by_params(entry)

    def wrapped(limit: int, shown: int) -> list[str]:
        parts = [_key_part(names, text, limit, room, line) for names, text in groups[:shown]]
        left = sum(len(names) for names, _ in groups[shown:])
        body = "; ".join(parts + ([f"(+{left} more)"] if left else []))
        text = f"{entry.heading}: {body}" if entry.heading else body
        lines = textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False)
        return [line.replace(KEEP, " ") for line in lines]

    if len(wrapped(MIN_LIST_CHARS, len(groups))) <= max_lines:  # every group fits: with lists as long as may be
        for limit in range(max_lines * line, MIN_LIST_CHARS - 4, -4):
            if len(lines := wrapped(max(limit, MIN_LIST_CHARS), len(groups))) <= max_lines:
                return lines
    shown = 1
    while shown < len(groups) and len(wrapped(MIN_LIST_CHARS, shown + 1)) <= max_lines:
        shown += 1
    lines = wrapped(MIN_LIST_CHARS, shown)
    return lines if len(lines) <= max_lines else [*lines[: max_lines - 1], _ellipsis_after(lines[max_lines - 1], width)]


def _ellipsis_after(line: str, width: int) -> str:
    """``line`` ending in `` …`` (words dropped from its end where that would pass ``width``): it goes on."""
    cut = cut_words(line, width - 2)
    return cut if cut.endswith(ELLIPSIS) else f"{cut} {ELLIPSIS}"


def _key_part(names: Sequence[str], params: str, limit: int, room: int, line: int) -> str:
    """Trials of one key entry with one parameters text: ``trials 0, 3: c=2``, the list in ``limit``
    characters and the parameters in ``room``. :data:`KEEP` holds ``trials`` to the first trial and
    the last trial to the parameters, and the parameters together where they take half a ``line``
    at most, so that no line break splits them."""
    trials = trial_list(names, limit).replace(" ", KEEP, 1)
    if not params:
        return trials
    params = cut_words(params, max(room, VALUE_CHARS))
    return f"{trials}:{KEEP}{params.replace(' ', KEEP) if len(params) <= line // 2 else params}"
