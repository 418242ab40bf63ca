"""Compose a PSM layer from registered components, and run it in parallel or streaming mode.

``PSMLayer.forward`` is the training path: all whole chunks are encoded at once, the prefix states
come from the tree scan, and the head reads every chunk against its prefix in one batched call (or
the head computes all three in one fused kernel, where it has one: :meth:`Head.fused_forward`); a
partial last chunk is read on its own, as streaming reads it, never padded.
``PSMLayer.stream(batch_size)`` is the inference path: tokens arrive one at a time (or in whole
chunks), features are computed token-locally, the head reads the partial chunk, and complete chunks
are pushed into an :class:`~psmsearch.scan.OnlineScan`. Both paths compute the same function.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from psmsearch import states as S
from psmsearch.components import Aggregator, ComponentContext, Encoder, Head
from psmsearch.config import ComponentSpec, ModelConfig
from psmsearch.errors import ConfigError, HyperParameterError, IncompatibleComponentsError, PSMSearchError, where_raised
from psmsearch.registry import Registry, get_registry
from psmsearch.scan import OnlineScan, autocast_on, check_mode, checked_initial_state, prefix_scan


def check_compatible(registry: Registry, encoder: str, aggregator: str, head: str) -> None:
    """Raise :class:`IncompatibleComponentsError` unless all three share one ``state_kind``."""
    infos = [registry.get("encoder", encoder), registry.get("aggregator", aggregator), registry.get("head", head)]
    kinds = {info.state_kind for info in infos}
    if len(kinds) > 1:
        described = ", ".join(f"{i.kind} {i.name!r} has state_kind {i.state_kind!r}" for i in infos)
        raise IncompatibleComponentsError(
            f"incompatible components: {described}; encoder, aggregator and head must share one state_kind"
        )


def compatible_combinations(registry: Registry | None = None) -> list[tuple[str, str, str]]:
    """Every (encoder, aggregator, head) triple of registered components that share a state kind."""
    registry = registry or get_registry()
    combinations = []
    for triple in itertools.product(registry.names("encoder"), registry.names("aggregator"), registry.names("head")):
        try:
            check_compatible(registry, *triple)
        except IncompatibleComponentsError:
            continue
        combinations.append(triple)
    return combinations


def _build(registry: Registry, kind: str, spec: ComponentSpec, context: ComponentContext) -> Any:
    info = registry.get(kind, spec.name)
    try:
        return info.cls(context, **spec.params)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err), field=f"model.{kind}") from None
    except AssertionError as err:  # an assert on the arguments (torch's MultiheadAttention: heads must divide the width)
        raise ConfigError(_failed_assertion(err), field=f"model.{kind}") from None


def _failed_assertion(err: AssertionError) -> str:
    """``AssertionError: MESSAGE (at FILE:LINE in FUNCTION)``: a bare ``assert`` has no message, so its line says
    what was checked."""
    return f"AssertionError{': ' + str(err) if str(err) else ''}{where_raised(err)}"


class PSMLayer(nn.Module):
    """``x[B, T, d] -> y[B, T, d]``: one prefix-scannable sequence-mixing layer."""

    def __init__(self, encoder: Encoder, aggregator: Aggregator, head: Head, chunk_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.head = head
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: ModelConfig, registry: Registry | None = None) -> "PSMLayer":
        """Build the layer named by ``config`` (components looked up in the registry)."""
        registry = registry or get_registry()
        check_compatible(registry, config.encoder.name, config.aggregator.name, config.head.name)
        context = ComponentContext(d_model=config.d_model, chunk_size=config.chunk_size)
        encoder = _build(registry, "encoder", config.encoder, context)
        context = ComponentContext(d_model=config.d_model, chunk_size=config.chunk_size, encoder=encoder)
        aggregator = _build(registry, "aggregator", config.aggregator, context)
        head = _build(registry, "head", config.head, context)
        return cls(encoder, aggregator, head, config.chunk_size)

    def forward(self, x: torch.Tensor, scan_mode: str = "auto", fused: bool | None = None) -> torch.Tensor:
        """The parallel (training) pass.

        ``scan_mode`` picks the prefix-scan engine (see :func:`~psmsearch.scan.prefix_scan`).
        ``fused=None`` lets the head replace summaries, scan and readout by one fused kernel where
        it offers one that pays (:meth:`Head.fused_forward`; only with ``scan_mode="auto"``);
        ``True`` requires the fused kernel, ``False`` forbids it.

        A last chunk shorter than ``c`` is read as the partial chunk it is, as streaming reads it:
        no padding token reaches the encoder, the aggregator or the head, so a component that is
        undefined on padding (a key normalised without an epsilon is NaN on a zero token) cannot
        put NaN into the outputs or gradients. A fused kernel, which needs whole chunks, gets the
        partial chunk's features padded with copies of its last position's (token-local features
        of real tokens, so finite wherever the real ones are; causality keeps them out of every
        real output).
        """
        check_mode(scan_mode)
        if fused and scan_mode != "auto":
            raise ValueError(f"fused=True replaces the prefix scan, so scan_mode must be 'auto', got {scan_mode!r}")
        if fused and not self._head_may_fuse():
            raise self._no_fused_path()
        self.check_input(x, "forward", tokens=True)
        batch, length, d = x.shape
        if length == 0:  # no chunk to scan; the stream's feed answers an empty input the same way
            return x.new_empty(batch, 0, d)  # [B, 0, d]
        c = self.chunk_size
        full, rest = divmod(length, c)
        f = self.encoder.features(_chunked(x[:, : full * c], full, c)) if full else None  # [B, n, c, ...]
        tail_f = self.encoder.features(_chunked(x[:, full * c :], 1, rest)) if rest else None  # [B, 1, r, ...]
        if fused or (fused is None and scan_mode == "auto" and self._head_may_fuse()):
            y = self._fused(f, tail_f, required=bool(fused))  # [B, N*c, d]
            if y is not None:
                return y[:, :length]  # [B, T, d]
            if fused:
                raise self._no_fused_path()
        return self._scanned(f, tail_f, batch, scan_mode)

    def _no_fused_path(self) -> PSMSearchError:
        return PSMSearchError(
            f"head {self.head.name!r} has no fused training path for encoder {self.encoder.name!r} "
            f"and aggregator {self.aggregator.name!r} (a head fuses only the components it "
            "recognises, never subclasses that override what its kernel computes); "
            "use fused=None or fused=False"
        )

    def check_input(self, x: Any, call: str, tokens: bool, batch_size: int | None = None) -> None:
        """Raise the error of an input the layer cannot read, naming what it expected.

        ``x`` must be a floating tensor ``[B, T, d_model]`` (``tokens``) or ``[B, d_model]`` (one
        token), on the device of the layer's parameters and in a dtype one of them has (any under
        autocast); a stream also fixes ``B``. Without this a wrong width or dtype failed inside a
        component's first matmul, with a torch message blamed on that component.
        """
        d_model = self.encoder.context.d_model
        batch = "B" if batch_size is None else str(batch_size)
        layout = f"[{batch}, T, {d_model}] (batch, tokens, d_model)" if tokens else f"[{batch}, {d_model}] (batch, d_model)"
        where = f"PSMLayer.{call}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a tensor {layout}, got a {type(x).__name__}")
        rank_ok = x.dim() == (3 if tokens else 2)
        if not rank_ok or x.shape[-1] != d_model or (batch_size is not None and x.shape[0] != batch_size):
            raise ValueError(f"{where}: x must be {layout}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{where}: x must be a floating tensor (token embeddings), got {x.dtype}")
        first = next((p for p in self.parameters() if p.is_floating_point()), None)  # streaming: per token
        if first is None:
            return
        if x.device != first.device:
            raise ValueError(f"{where}: x is on {x.device}, the layer's parameters on {first.device}; "
                             "move one to the other")
        if (x.dtype != first.dtype and x.dtype not in {p.dtype for p in self.parameters()}
                and not autocast_on(x.device.type)):
            raise ValueError(f"{where}: x is {x.dtype}, the layer's parameters {first.dtype}; "
                             f"cast x (x.to({first.dtype})) or the layer")

    def _head_may_fuse(self) -> bool:
        """Whether the head overrides :meth:`Head.fused_forward` (else trying it would only cost time)."""
        return type(self.head).fused_forward is not Head.fused_forward

    def _fused(self, f: Any, tail_f: Any, required: bool) -> torch.Tensor | None:
        """The head's fused pass over whole chunks, the partial last one padded (see :meth:`forward`), or ``None``.

        ``f[B, n, c, ...]``: the whole chunks' features (or None); ``tail_f[B, 1, r, ...]``: the
        partial chunk's (or None). Returns ``y[B, N*c, d]``, padded rows included.
        """
        c = self.chunk_size
        if tail_f is not None:
            padded = S.tree_map(lambda leaf: _repeat_last_position(leaf, c), tail_f)  # [B, 1, c, ...]
            f = padded if f is None else S.cat([f, padded], dim=1)  # [B, N, c, ...]
        y = self.head.fused_forward(self.encoder, self.aggregator, f, required=required)  # [B, N, c, d]
        if y is None:
            return None
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2], y.shape[3])  # [B, N*c, d]

    def _scanned(self, f: Any, tail_f: Any, batch: int, scan_mode: str) -> torch.Tensor:
        """Summaries of the whole chunks, the prefix scan, and the head over each chunk.

        ``f[B, n, c, ...]`` are the features of the ``n`` whole chunks and ``tail_f[B, 1, r, ...]``
        those of a partial last chunk (each None where there is none). Every whole chunk is
        summarized in one call (``f`` as the encoder made it, contiguous); the last chunk's summary
        enters no exclusive prefix, so the tree and sequential engines never pass it to ``agg`` (an
        associative aggregator's own ``scan`` receives it). A partial last chunk is never
        summarized: the scan appends the fold of the whole chunks before it instead (``total=True``).
        """
        full = 0 if f is None else S.size(f, 1)
        if full:
            summaries = self.encoder.summarize(f)  # [B, n, ...]
            prefixes = prefix_scan(self.aggregator, summaries, mode=scan_mode, total=tail_f is not None)  # [B, N, ...]
        else:
            prefixes = S.unsqueeze(self.initial_prefix(batch), 1)  # [B, 1, ...]
        outputs = []
        if full:
            y = self.head(_contiguous(S.take(prefixes, 1, slice(0, full))), f)  # [B, n, c, d]
            outputs.append(y.reshape(y.shape[0], y.shape[1] * y.shape[2], y.shape[3]))  # [B, n*c, d]
        if tail_f is not None:
            y = self.head(_contiguous(S.take(prefixes, 1, slice(full, full + 1))), tail_f)  # [B, 1, r, d]
            outputs.append(y.reshape(y.shape[0], y.shape[2], y.shape[3]))  # [B, r, d]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [B, T, d]

    def initial_prefix(self, batch: int) -> S.State:
        """The aggregator's ``initial_state((batch,))``, checked against the encoder's ``state_shape`` and,
        where the encoder has floating parameters, their dtype and device (those of the chunk states it
        makes): it is the prefix the head reads first, before any chunk state exists to compare with."""
        shape = self.encoder.state_shape
        shapes = shape if shape and isinstance(shape[0], tuple) else (shape,)
        like = next((p for p in self.encoder.parameters() if p.is_floating_point()), None)
        return checked_initial_state(self.aggregator, (batch,), [(batch, *s) for s in shapes], like=like)

    def stream(self, batch_size: int) -> "LayerStream":
        """A fresh streaming state for ``batch_size`` sequences."""
        return LayerStream(self, batch_size)


def _chunked(x: torch.Tensor, chunks: int, width: int) -> torch.Tensor:
    """``x[B, chunks*width, d] -> [B, chunks, width, d]``, contiguous as the padded tensor it replaces
    was (components may ``view`` their inputs). The sizes are given, so an empty batch works too."""
    return x.contiguous().view(x.shape[0], chunks, width, x.shape[-1])  # [B, chunks, width, d]


def _repeat_last_position(leaf: torch.Tensor, width: int) -> torch.Tensor:
    """``leaf[B, 1, r, ...] -> [B, 1, width, ...]``: the last position repeated into the missing ones."""
    missing = leaf[:, :, -1:].expand(*leaf.shape[:2], width - leaf.shape[2], *leaf.shape[3:])  # [B, 1, width-r, ...]
    return torch.cat([leaf, missing], dim=2)  # [B, 1, width, ...]


def _contiguous(state: Any) -> Any:
    """A slice of the prefixes, contiguous (a copy only where the slice is not), as heads received them whole."""
    return S.tree_map(lambda leaf: leaf.contiguous(), state)


class LayerStream:
    """Online evaluation of a :class:`PSMLayer`: O(log n) states (O(1) if associative) plus one partial chunk."""

    def __init__(self, layer: PSMLayer, batch_size: int) -> None:
        self.layer = layer
        self.batch_size = batch_size
        self.scan = OnlineScan(layer.aggregator, (batch_size,))
        self.prefix = layer.initial_prefix(batch_size)
        self.buffer: Any = None  # features of the current partial chunk, [B, j, ...]
        self.position = 0  # tokens in the current partial chunk
        self.tokens_seen = 0

    def _complete_chunk(self, f: Any) -> None:
        self.scan.push(self.layer.encoder.summarize(f))  # state [B, ...]
        self.prefix = self.scan.prefix()
        self.buffer = None
        self.position = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One token ``x[B, d] -> y[B, d]``."""
        self.layer.check_input(x, "stream(...).step", tokens=False, batch_size=self.batch_size)
        return self._step(x)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        f_token = self.layer.encoder.features(x[:, None, :], offset=self.position)  # [B, 1, ...]
        self.buffer = f_token if self.buffer is None else S.cat([self.buffer, f_token], dim=1)
        y = self.layer.head.forward_last(self.prefix, self.buffer)  # [B, d]
        self.position += 1
        self.tokens_seen += 1
        if self.position == self.layer.chunk_size:
            self._complete_chunk(self.buffer)
        return y

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens ``x[B, m, d] -> y[B, m, d]``; whole aligned chunks go through in one call."""
        self.layer.check_input(x, "stream(...).feed", tokens=True, batch_size=self.batch_size)
        c = self.layer.chunk_size
        outputs, start, m = [], 0, x.shape[1]
        if m == 0:
            return x.new_empty(x.shape[0], 0, x.shape[2])  # [B, 0, d]
        while start < m:
            if self.position == 0 and m - start >= c:
                chunk = x[:, start : start + c]  # [B, c, d]
                f = self.layer.encoder.features(chunk, offset=0)  # [B, c, ...]
                outputs.append(self.layer.head(self.prefix, f))  # [B, c, d]
                self.tokens_seen += c
                self._complete_chunk(f)
                start += c
            else:
                outputs.append(self._step(x[:, start])[:, None])  # [B, 1, d]
                start += 1
        return torch.cat(outputs, dim=1)

    def retained(self) -> list[Any]:
        """Every state tensor this stream keeps alive (not the layer's parameters)."""
        held = list(self.scan.retained())
        if self.scan.count > 0 or self._holds_initial_prefix():
            held.append(self.prefix)
        if self.buffer is not None:
            held.append(self.buffer)
        return held

    def _holds_initial_prefix(self) -> bool:
        """Whether, before the first chunk completes, the aggregator's initial state is memory of this
        stream's own (the affine zero state), not a view of the layer's parameters (T-PSM's learned
        initial tokens, expanded over the batch), which the model holds anyway.

        After the first chunk the prefix is one of the scan's states and counted with them.
        """
        if self.scan.count > 0:
            return False
        model_storages = {(str(t.device), t.untyped_storage().data_ptr())
                          for t in (*self.layer.parameters(), *self.layer.buffers())}
        return any((str(leaf.device), leaf.untyped_storage().data_ptr()) not in model_storages
                   for leaf in S.leaves(self.prefix) if isinstance(leaf, torch.Tensor))

    def state_nbytes(self) -> int:
        """Bytes this stream's retained tensors really occupy (each storage once)."""
        return S.retained_nbytes(self.retained())

    def expected_nbytes(self) -> int:
        """The components' own accounting of what this stream should hold right now.

        Retained chunk states (and an initial prefix of the stream's own before the first chunk)
        times ``encoder.state_nbytes``, plus the partial chunk's features.
        """
        per_state = self.layer.encoder.state_nbytes(self.batch_size, _dtype_of(self.layer))
        n_states = len({id(s) for s in self.scan.retained()}) + self._holds_initial_prefix()
        return n_states * per_state + (S.nbytes(self.buffer) if self.buffer is not None else 0)


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.get_default_dtype()


def validate_model_config(config: ModelConfig, registry: Registry | None = None) -> None:
    """Check names, hyperparameters and compatibility, and build the layer on the meta device.

    Raises a :class:`PSMSearchError` naming the field, the value and what is allowed. A component
    that rejects its arguments (``ValueError``, ``TypeError``, or a failed ``assert``, as torch's own
    modules check theirs) makes a configuration error with its message. Any other exception in a constructor (a plugin's bug, or an operation the meta
    device lacks) is not the configuration's fault: it is left to the trial, whose "building the
    model" phase reports it with its plugin line (``train`` exits 1, a search fails that trial only).
    """
    if config.kind != "psm":
        return
    registry = registry or get_registry()
    for kind in ("encoder", "aggregator", "head"):
        spec: ComponentSpec = getattr(config, kind)
        try:
            info = registry.get(kind, spec.name)
        except PSMSearchError as err:
            raise ConfigError(str(err), field=f"model.{kind}") from None
        try:
            info.cls.resolve_hyperparameters(spec.params)
        except HyperParameterError as err:
            raise ConfigError(str(err), field=f"model.{kind}.{err.name}") from None
        except ValueError as err:
            raise ConfigError(str(err), field=f"model.{kind}") from None
    try:
        check_compatible(registry, config.encoder.name, config.aggregator.name, config.head.name)
    except IncompatibleComponentsError as err:
        raise ConfigError(str(err), field="model") from None
    with torch.device("meta"):  # build for real, allocate nothing: catches constraints between values
        try:
            PSMLayer.from_config(config, registry)
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:  # a component rejecting its arguments
            raise ConfigError(f"{type(err).__name__}: {err}", field="model") from None
        except AssertionError as err:  # an assert on them
            raise ConfigError(_failed_assertion(err), field="model") from None
        except Exception:  # noqa: BLE001, S110 - not the configuration's fault: see the docstring
            pass
