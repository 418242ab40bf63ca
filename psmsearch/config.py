"""Typed model configuration: which components, their hyperparameters, the chunk size and widths.

A component is named either by a bare string (``aggregator: attention``) or by a mapping that
holds its name and its own hyperparameters (``aggregator: {name: attention, layers: 2}``).
Validation against the registry (unknown names, hyperparameter ranges, compatible state kinds)
happens in :func:`psmsearch.composer.validate_model_config`, where the plugins are known.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from psmsearch.errors import suggest

ModelKind = Literal["psm", "gpt", "swa"]


class ComponentSpec(BaseModel):
    """A registered component by name plus its hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_short_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "params" not in value:
            rest = {k: v for k, v in value.items() if k != "name"}
            return {"name": value.get("name"), "params": rest}
        return value

    def flat(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: the short form, for logging and YAML."""
        return {"name": self.name, **self.params}


# The ModelConfig fields each model kind reads; the others are ignored by it (and not searched for it).
_SHARED_FIELDS = frozenset({"kind", "d_model", "n_layers", "mlp_ratio", "dropout"})
KIND_FIELDS: dict[str, frozenset[str]] = {
    "psm": _SHARED_FIELDS | {"chunk_size", "encoder", "aggregator", "head"},
    "gpt": _SHARED_FIELDS | {"n_heads"},
    "swa": _SHARED_FIELDS | {"n_heads", "window"},
}
MODEL_FIELDS: frozenset[str] = frozenset().union(*KIND_FIELDS.values())


def unread_model_field_message(key: str, kinds: Sequence[str], how: str = "set", fix: str = "drop it") -> str:
    """Why model field ``key`` is refused when the model kind is one of ``kinds``, or ``""`` if one reads it.

    ``ModelConfig`` holds the fields of every kind, so a field that the chosen kind ignores (``n_heads``
    under ``kind: psm``) would validate and then do nothing; ``train`` and ``search`` refuse it instead.
    """
    if key not in MODEL_FIELDS or any(key in KIND_FIELDS[k] for k in kinds):
        return ""
    users = sorted(k for k, fields in KIND_FIELDS.items() if key in fields)
    message = f"model.kind {'/'.join(kinds)} never reads it (read by: {', '.join(users)}); {fix}"
    if how:
        message = f"{how}, but {message}"
    if key == "n_heads" and "psm" in kinds:
        message += " (a PSM's attention heads are its components' hyperparameters, e.g. aggregator: {name: attention, heads: 4})"
    return message


class ModelConfig(BaseModel):
    """A model: a PSM (``kind: psm``) or a baseline (``gpt``: full causal attention, ``swa``: sliding window)."""

    model_config = ConfigDict(extra="forbid")

    kind: ModelKind = "psm"
    d_model: int = Field(64, ge=4, le=8192)
    n_layers: int = Field(1, ge=1, le=64)
    mlp_ratio: int = Field(4, ge=1, le=16)
    chunk_size: int = Field(8, ge=1, le=65536)
    encoder: ComponentSpec = ComponentSpec(name="embed")
    aggregator: ComponentSpec = ComponentSpec(name="attention")
    head: ComponentSpec = ComponentSpec(name="attention")
    n_heads: int = Field(4, ge=1, le=256, description="attention heads of the gpt / swa baselines")
    window: int = Field(64, ge=1, description="attention window of the swa baseline")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def flat_params(self) -> dict[str, Any]:
        """Flat ``{"model.aggregator": "attention", "model.aggregator.layers": 2, ...}`` for tracking.

        Only the fields this model's kind reads (:data:`KIND_FIELDS`): a GPT baseline logs no chunk size.
        """
        out: dict[str, Any] = {}
        for key, value in self.model_dump().items():
            if key not in KIND_FIELDS[self.kind]:
                continue
            if isinstance(value, dict) and "name" in value:
                out[f"model.{key}"] = value["name"]
                for pk, pv in value["params"].items():
                    out[f"model.{key}.{pk}"] = pv
            else:
                out[f"model.{key}"] = value
        return out


def model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model whose fields sit at ``loc`` below ``model``, or None where ``loc`` holds a plain value.

    ``model_at(SpaceHeader, ["objectives", 0])`` is ``Objective``: list items and optional values are
    looked through, so an unknown-field error anywhere can list the fields that are allowed there.
    """
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is list and str(part).isdigit():
            current = get_args(current)[0]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (the first member that is a model or a list, else the first non-None one)."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return annotation
    members = [a for a in get_args(annotation) if a is not type(None)]
    for member in members:
        if get_origin(member) is list or (isinstance(member, type) and issubclass(member, BaseModel)):
            return member
    return members[0] if members else annotation


def unknown_field_message(key: str, allowed: Sequence[str]) -> str:
    """``unknown field 'trails'; allowed: jobs, trials. Did you mean 'trials'?``"""
    return f"unknown field {key!r}; allowed: {', '.join(sorted(allowed)) or 'none'}.{suggest(key, allowed)}"
