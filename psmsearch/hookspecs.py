"""Plugin hook specifications (pluggy project ``psmsearch``).

Every hook receives a ``register`` callback; a plugin calls it once per thing it provides::

    from psmsearch import hookimpl

    @hookimpl
    def register_aggregators(register):
        register(MyAggregator)

The callback records which plugin registered what, so clashes and failures are reported by name.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("psmsearch")
hookimpl = pluggy.HookimplMarker("psmsearch")


@hookspec
def register_encoders(register: Callable[..., None]) -> None:
    """Register :class:`psmsearch.Encoder` subclasses: ``register(EncoderClass)``."""


@hookspec
def register_aggregators(register: Callable[..., None]) -> None:
    """Register :class:`psmsearch.Aggregator` subclasses: ``register(AggregatorClass)``."""


@hookspec
def register_heads(register: Callable[..., None]) -> None:
    """Register :class:`psmsearch.Head` subclasses: ``register(HeadClass)``."""


@hookspec
def register_tasks(register: Callable[..., None]) -> None:
    """Register :class:`psmsearch.tasks.Task` subclasses: ``register(TaskClass)``."""

