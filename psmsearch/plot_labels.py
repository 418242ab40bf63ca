"""Bounded text for the trials named on ``compare``'s plots.

Several trials can share one point of objectives.png or one curve of accuracy_vs_length.png (trials
at chance accuracy with the same state size, say). Their names used to be joined in full, so a label
grew with the number of trials and made ``tight_layout`` shrink the plot area (to 0.12 of the
figure's width with 10 trials on one point; from 12 on it gave up and the label ran off the
figure). Here a label holds at most :data:`LABEL_CHARS` characters, runs of consecutive trials read
``trials 3–9``, and a group that does not fit gets a key letter (``A: trials 3, 5, 7 (+27 more)``)
whose complete list goes in a key below the plot (:func:`key_lines`), itself bounded to
:data:`KEY_LINES` lines. Pure text: no matplotlib here.
"""

from __future__ import annotations

import re
import string
import textwrap
from dataclasses import dataclass
from typing import Sequence

LABEL_CHARS = 32  # longest label on a point or legend entry, key letter included
NAME_CHARS = 16  # longest single trial name (a run id or a name without a trial number is cut)
KEY_LINES = 6  # most lines of the key under a plot
ELLIPSIS = "…"
TRIAL_NAME = re.compile(r"trial-(\d+)$")


@dataclass(frozen=True)
class GroupLabel:
    """What a plot writes for one group of trials (run names) drawn on one spot: ``text``, at most
    :data:`LABEL_CHARS` long, and ``key``, the letter the key under the plot lists the whole group
    by, empty when ``text`` names every trial already."""

    text: str
    names: tuple[str, ...]
    key: str = ""


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


def needs_key(names: Sequence[str], limit: int = LABEL_CHARS) -> bool:
    """Whether a label of ``limit`` characters cannot name every trial of the group."""
    return trial_list(names, limit) != trial_list(names, 10**9)


def group_label(names: Sequence[str], key: str, limit: int = LABEL_CHARS) -> GroupLabel:
    """The bounded label of one group; ``key`` is taken (``A: trials 3, 5 (+27 more)``) only when
    the label cannot name every trial."""
    if not needs_key(names, limit):
        return GroupLabel(trial_list(names, limit), tuple(names))
    return GroupLabel(f"{key}: {trial_list(names, limit - len(key) - 2)}", tuple(names), key)


def group_labels(groups: Sequence[Sequence[str]], limit: int = LABEL_CHARS) -> list[GroupLabel]:
    """One bounded label per group of trial names, key letters given in order to those that need one."""
    labels: list[GroupLabel] = []
    for names in groups:
        labels.append(group_label(names, key_letter(sum(bool(label.key) for label in labels)), limit))
    return labels


def key_letter(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: keys that cannot be read as trial numbers."""
    letters = string.ascii_uppercase
    return key_letter(index // 26 - 1) + letters[index % 26] if index >= 26 else letters[index]


def key_lines(entries: Sequence[tuple[str, Sequence[str]]], width: int, max_lines: int = KEY_LINES) -> list[str]:
    """The key under a plot: for each ``(heading, names)`` entry, ``heading: trials ...`` wrapped to
    ``width`` characters. The entries share ``max_lines`` lines: each gets its share (one at least)
    and says ``(+N more)`` where its trials do not fit; entries past ``max_lines`` are counted in a
    last line that sends the reader to the table ``psmsearch compare`` prints."""
    if not entries:
        return []
    shown = entries if len(entries) <= max_lines else entries[: max_lines - 1]
    share = max(1, max_lines // len(shown))
    lines = [line for heading, names in shown for line in _key_entry(heading, names, width, share)]
    if len(shown) < len(entries):
        lines.append(f"… {len(entries) - len(shown)} more: the table psmsearch compare prints lists every trial")
    return lines


def _key_entry(heading: str, names: Sequence[str], width: int, max_lines: int) -> list[str]:
    """One key entry wrapped to ``width`` in at most ``max_lines`` lines, its list cut to fit."""
    indent = " " * (len(heading) + 2)
    limit = max_lines * (width - len(indent))
    while True:
        lines = textwrap.wrap(f"{heading}: {trial_list(names, limit)}", width, subsequent_indent=indent,
                              break_on_hyphens=False)
        if len(lines) <= max_lines or limit <= width // 2:
            return lines[:max_lines]
        limit -= 4
