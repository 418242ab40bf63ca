"""Task contract: a data source plus the metrics a trial reports for it.

Tasks are registered by plugins through ``register_tasks(register)``. The trainer issue fills in the
data and evaluation protocol; the registry only needs the class metadata declared here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from psmsearch.components import HyperParameter


class Task:
    """Base class of tasks: declares its name and hyperparameters like components do."""

    kind: ClassVar[str] = "task"
    name: ClassVar[str] = ""
    hyperparameters: ClassVar[Sequence[HyperParameter]] = ()
    description: ClassVar[str] = ""

    def __init__(self, **hparams: Any) -> None:
        self.hparams = self.resolve_hyperparameters(hparams)

    @classmethod
    def resolve_hyperparameters(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and values validated, as for components."""
        from psmsearch.components import Component

        return Component.resolve_hyperparameters.__func__(cls, given)  # type: ignore[attr-defined]
