"""A complete third-party psmsearch plugin: the ``gated`` aggregator.

Installed with ``pip install ./examples/plugin_package``, it is found through the ``psmsearch``
entry-point group; nothing in psmsearch itself names it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from psmsearch import Aggregator, ComponentContext, HyperParameter, hookimpl


class GatedAggregator(Aggregator):
    """Slot-wise GRU-style update: ``z * newer + (1 - z) * tanh(W [older, newer])`` (non-associative)."""

    name = "gated"
    state_kind = "tokens"
    associative = False
    hyperparameters = (HyperParameter("gate_bias", "float", 1.0, low=-4.0, high=4.0, help="initial bias of the update gate"),)

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        slots = int(context.encoder.state_shape[0])  # type: ignore[union-attr]
        self.gate = nn.Linear(2 * d, d)
        nn.init.constant_(self.gate.bias, self.hparams["gate_bias"])
        self.candidate = nn.Linear(2 * d, d)
        self.initial = nn.Parameter(torch.zeros(slots, d))  # [k, d]

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        both = torch.cat([older, newer], dim=-1)  # [*, k, 2d]
        z = torch.sigmoid(self.gate(both))  # [*, k, d]
        return z * newer + (1 - z) * torch.tanh(self.candidate(both))  # [*, k, d]

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return self.initial.expand(*batch_shape, *self.initial.shape)  # [*, k, d]


@hookimpl
def register_aggregators(register: Callable[..., None]) -> None:
    register(GatedAggregator)
