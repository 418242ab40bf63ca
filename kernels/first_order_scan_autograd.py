"""Autograd and ``torch.func`` rules of :func:`.first_order_scan`, shared by every backend.

Autograd never records a Python loop: the backward of a scan is a scan in the
opposite direction, which each backend module runs with its own kernels
(``scan_backward``). The rules are written in the form ``torch.func`` needs
(``forward`` without ``ctx``, plus ``setup_context``), so that
``torch.func.grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``vmap`` and their
compositions, such as per-sample gradients ``vmap(grad(f))``, work on every
model that scans, as they do on models made of PyTorch ops alone:

* **reverse mode**: a plain ``backward()`` (no graph of the gradient is being
  built) runs the backend's fused backward kernel, through :class:`ScanGradients`.
  When the backward is itself differentiated (``create_graph=True``, forward-mode
  AD active, and always under ``torch.func``, whose ``grad`` and ``vjp`` record
  it), it runs as :func:`gradients_as_scans` instead: one more
  :class:`FirstOrderScan` in the opposite direction plus PyTorch ops, which is
  differentiable again, to any order (double backward, ``hessian``), and
  vmappable (``jacrev``, per-sample gradients);
* **forward mode** (``jvp``): differentiating ``h_t = a_t h_{t-1} + b_t`` gives
  ``ḣ_t = a_t ḣ_{t-1} + (ȧ_t h_{t-1} + ḃ_t)`` from ``ḣ_{-1} = ḣ0``: one more scan
  with the same gates, on the same backend;
* **vmap**: the vmapped dim is folded into the batch dim ``B``, so a vmapped call
  is one kernel call over ``V B`` items, not ``V`` calls.

Two things raise rather than come out wrong: forward mode over forward mode
(``jacfwd(jacfwd(f))``, ``jvp`` of ``jvp``), where PyTorch drops the outer
tangent inside any custom Function's ``jvp`` (pytorch/pytorch#197867; the guard
counts active ``torch.func`` forward-mode transforms, so a ``jvp`` merely nested
inside another one raises too), and PyTorch's legacy batched backward
(``is_grads_batched=True``, ``autograd.functional.jacobian(vectorize=True)``),
which runs no Function rules. Under ``torch.compile`` the scan is a graph break,
and under traces that record PyTorch ops (``make_fx``, ``torch.export``) it is an
out-of-place step loop (both decided in :func:`.first_order_scan`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.autograd import forward_ad

from . import _dispatch, first_order_scan_reference

try:  # private: which torch.func transforms are active (absent in some PyTorch releases)
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - depends on the PyTorch release
    TransformType = retrieve_all_functorch_interpreters = None

GradTriple = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

NO_SECOND_DERIVATIVE = (
    "{kernel}: this backward runs kernels that build no graph, so it has no derivative of its own "
    "(double backward, torch.func.hessian and other derivatives of a gradient){hint}"
)


NESTED_FORWARD_MODE = (
    "{kernel}: forward mode over forward mode (jacfwd of jacfwd, jvp of jvp) is not supported: PyTorch "
    "drops the outer tangent inside a custom autograd.Function's jvp and the result would be silently "
    "wrong (pytorch/pytorch#197867). Second derivatives work with reverse mode on the outside or inside: "
    "torch.func.hessian (jacfwd of jacrev), jacrev of jacfwd, jacrev of jacrev, double backward"
)


LEGACY_VMAP = (
    "first_order_scan: autograd.grad(..., is_grads_batched=True) and torch.autograd.functional.jacobian/hessian"
    "(vectorize=True) batch the backward with PyTorch's legacy vmap, which runs no custom autograd.Function "
    "rules; use torch.func (jacrev, jacfwd, hessian, or vmap over vjp / over autograd.grad), which does"
)
# Whether a tensor is batched by that legacy vmap (private API; None where it is gone).
_is_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)

_RECORD_HINT = ("; a backward run with grad mode on (create_graph=True, torch.func) or with forward-mode AD "
                "active is differentiable")


def functorch_jvp_depth() -> int | None:
    """How many ``torch.func.jvp``-style transforms (``jvp``, ``jacfwd``) are active; None where torch
    no longer says (the private API is gone)."""
    if retrieve_all_functorch_interpreters is None:
        return None
    return sum(interpreter.key() == TransformType.Jvp for interpreter in retrieve_all_functorch_interpreters())


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (dual tensors may be about); True where torch no longer says."""
    return getattr(forward_ad, "_current_level", 0) >= 0


def implementation(backend: str) -> ModuleType:
    """The module holding ``scan_forward`` / ``scan_backward`` of ``backend`` (imported on first use)."""
    if backend == "triton":
        from . import first_order_scan_triton

        return first_order_scan_triton
    if backend == "numba":
        from . import first_order_scan_numba

        return first_order_scan_numba
    return first_order_scan_reference


class FirstOrderScan(torch.autograd.Function):
    """``h = scan(a, b, h0)`` on ``backend``, differentiable in ``a``, ``b`` and ``h0`` in both modes."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,  # type: ignore[override]
                reverse: bool, backend: str) -> torch.Tensor:
        return implementation(backend).scan_forward(a, b, h0, reverse)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        a, b, h0, reverse, backend = inputs
        ctx.save_for_backward(a, output, h0)
        ctx.save_for_forward(a, output, h0)
        ctx.reverse, ctx.backend, ctx.b_dtype = reverse, backend, b.dtype

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if _is_legacy_batched is not None and _is_legacy_batched(dh):
            raise RuntimeError(LEGACY_VMAP)
        a, h, h0 = ctx.saved_tensors
        need_a, need_b, need_h0 = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or forward_ad_active():  # the backward is differentiated: compose it
            da, db, dh0 = gradients_as_scans(a, h, h0, dh, ctx.reverse, ctx.backend, need_a)
        else:
            da, db, dh0 = ScanGradients.apply(a, h, h0, dh, ctx.reverse, ctx.backend, need_a)
        da = _sum_to(da, a) if need_a else None
        db = db.to(ctx.b_dtype) if need_b else None
        dh0 = _sum_to(dh0, h0) if (need_h0 and h0 is not None) else None
        return da, db, dh0, None, None

    @staticmethod
    def jvp(ctx: Any, a_dot: torch.Tensor | None, b_dot: torch.Tensor | None, h0_dot: torch.Tensor | None,
            *_: Any) -> torch.Tensor:
        """``ḣ = scan(a, ȧ ⊙ h_prev + ḃ, ḣ0)``: the tangent of the output, in its dtype."""
        if (functorch_jvp_depth() or 0) > 1:
            raise RuntimeError(NESTED_FORWARD_MODE.format(kernel="first_order_scan"))
        a, h, h0 = ctx.saved_tensors
        dtype = _dispatch.compute_dtype(a, h)
        inputs = None if b_dot is None else b_dot.to(dtype)                    # [B, T, *S]
        if a_dot is not None:
            gate_part = a_dot.to(dtype) * previous_states(h, h0, ctx.reverse).to(dtype)  # [B, T, *S]
            inputs = gate_part if inputs is None else inputs + gate_part
        if inputs is None:
            inputs = torch.zeros(h.shape, dtype=dtype, device=h.device)
        inputs = inputs.expand(h.shape)
        start = None if h0_dot is None else h0_dot.to(dtype)
        return FirstOrderScan.apply(a, inputs, start, ctx.reverse, ctx.backend).to(h.dtype)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], a: torch.Tensor, b: torch.Tensor,
             h0: torch.Tensor | None, reverse: bool, backend: str) -> tuple[torch.Tensor, int]:
        """One call over ``V B`` batch items: the vmapped dim folded into ``B``."""
        a_dim, b_dim, h0_dim = in_dims[:3]
        size = info.batch_size
        b_all = vmap_dim_first(b, b_dim, size)                                # [V, B, T, *S]
        batch = b_all.shape[1]
        out = FirstOrderScan.apply(_fold_gates(a, a_dim, size, batch), fold_vmap_dim(b_all),
                                   _fold_state(h0, h0_dim, size, b_all.shape[:2] + b_all.shape[3:]),
                                   reverse, backend)                            # [V B, T, *S]
        return out.unflatten(0, (size, batch)), 0


class ScanGradients(torch.autograd.Function):
    """``(da, db, dh0)`` of a scan from the backend's fused backward kernel (unreduced, see ``scan_backward``).

    Used only where the gradient is not differentiated (grad mode off in the
    backward, no forward-mode AD level open). A Function rather than a plain
    call so that it can be vmapped (``autograd.grad`` with batched gradients,
    ``is_grads_batched``) and so that a derivative that reaches it all the same
    raises instead of coming out wrong.
    """

    @staticmethod
    def forward(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,  # type: ignore[override]
                dh: torch.Tensor, reverse: bool, backend: str, need_da: bool) -> GradTriple:
        return implementation(backend).scan_backward(a, h, h0, dh, reverse, need_da)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: GradTriple) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(NO_SECOND_DERIVATIVE.format(kernel="first_order_scan (fused backward)", hint=_RECORD_HINT))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise RuntimeError(NO_SECOND_DERIVATIVE.format(kernel="first_order_scan (fused backward)", hint=_RECORD_HINT))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], a: torch.Tensor, h: torch.Tensor,
             h0: torch.Tensor | None, dh: torch.Tensor, reverse: bool, backend: str,
             need_da: bool) -> tuple[GradTriple, tuple[int | None, ...]]:
        """One call over ``V B`` batch items; every gradient comes back with the vmapped dim first."""
        a_dim, h_dim, h0_dim, dh_dim = in_dims[:4]
        size = info.batch_size
        h_all = vmap_dim_first(h, h_dim, size)                                 # [V, B, T, *S]
        dh_all = vmap_dim_first(dh, dh_dim, size)                              # [V, B, T, *S]
        batch = h_all.shape[1]
        grads = ScanGradients.apply(_fold_gates(a, a_dim, size, batch), fold_vmap_dim(h_all),
                                    _fold_state(h0, h0_dim, size, h_all.shape[:2] + h_all.shape[3:]),
                                    fold_vmap_dim(dh_all), reverse, backend, need_da)
        unfolded = tuple(None if g is None else g.unflatten(0, (size, batch)) for g in grads)
        return unfolded, tuple(None if g is None else 0 for g in grads)


def gradients_as_scans(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor,
                       reverse: bool, backend: str, need_da: bool) -> GradTriple:
    """``(da, db, dh0)`` as :class:`ScanGradients` computes them, from differentiable pieces.

    ``g_t = dh_t + a_{t+1} g_{t+1}`` (``a_{t-1} g_{t-1}`` when ``reverse``) is a
    :class:`FirstOrderScan` in the opposite direction with the gates shifted by
    one step; ``db = g``, ``da = g ⊙ h_prev``, ``dh0 = a_first ⊙ g_first``. Every
    piece has reverse, forward and vmap rules, so derivatives of the gradient
    work to any order. It costs a copy of the shifted gates and of ``h_prev``
    more than the fused kernel, so a plain ``backward()`` does not use it.
    """
    dtype = _dispatch.compute_dtype(a, h, dh)
    if h.shape[1] == 0:  # no steps: nothing flows back but zeros
        zeros = torch.zeros(h.shape, dtype=dtype, device=h.device)           # [B, 0, *S]
        state = torch.zeros(h.shape[:1] + h.shape[2:], dtype=dtype, device=h.device)  # [B, *S]
        return (zeros if need_da else None), dh.to(dtype), state
    gates = _shifted_gates(a.to(dtype), reverse)                              # [B|1, T|1, *Sa]
    g = FirstOrderScan.apply(gates, dh.to(dtype), None, not reverse, backend)  # [B, T, *S]
    first = h.shape[1] - 1 if reverse else 0
    dh0 = a[:, min(first, a.shape[1] - 1)].to(dtype) * g[:, first]           # [B, *S]
    da = g * previous_states(h, h0, reverse).to(dtype) if need_da else None   # [B, T, *S]
    return da, g, dh0


def _shifted_gates(a: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The gates of the gradient scan: at step ``t``, ``a_{t+1}`` (``a_{t-1}`` when ``reverse``).

    That scan runs against the forward direction and starts from zero, so the
    gate of its first step multiplies zero: any value does; the edge gate is
    repeated to keep the shape. Gates shared by all steps stay as they are.
    """
    if a.shape[1] == 1:
        return a
    if reverse:
        return torch.cat([a[:, :1], a[:, :-1]], dim=1)
    return torch.cat([a[:, 1:], a[:, -1:]], dim=1)


def previous_states(h: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """``h_prev [B, T, *S]``: the state each step starts from (``h0``, or zero, at the first step)."""
    state_shape = h.shape[:1] + h.shape[2:]
    start = (torch.zeros(state_shape, dtype=h.dtype, device=h.device) if h0 is None
             else h0.to(h.dtype).expand(state_shape)).unsqueeze(1)            # [B, 1, *S]
    if reverse:
        return torch.cat([h[:, 1:], start], dim=1)
    return torch.cat([start, h[:, :-1]], dim=1)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a gradient over the dims that ``like`` broadcast, in ``like``'s dtype."""
    return grad.sum_to_size(like.shape).to(like.dtype)


def vmap_dim_first(x: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """In a vmap rule: ``x`` with its vmapped dim first; an input that is not vmapped is expanded (a view, no copy)."""
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def fold_vmap_dim(x: torch.Tensor) -> torch.Tensor:
    """In a vmap rule: ``[V, B, ...]`` as ``[V B, ...]`` (a copy only where the dims cannot be merged in place)."""
    return x.flatten(0, 1)


def _fold_gates(a: torch.Tensor, dim: int | None, size: int, batch: int) -> torch.Tensor:
    """Gates for the folded batch of ``size * batch`` items.

    Gates that are not vmapped and shared by the batch (batch dim 1) stay shared;
    otherwise they are broadcast to ``[V, B, ...]`` first, then folded.
    """
    if dim is None and a.shape[0] == 1:
        return a
    gates = vmap_dim_first(a, dim, size)                                     # [V, B|1, T|1, *Sa]
    return fold_vmap_dim(gates.expand(size, batch, *gates.shape[2:]))


def _fold_state(h0: torch.Tensor | None, dim: int | None, size: int,
                state_shape: torch.Size) -> torch.Tensor | None:
    """``h0`` (broadcastable to ``[B, *S]``) as ``[V B, *S]``; ``state_shape`` is ``[V, B, *S]``."""
    if h0 is None:
        return None
    states = vmap_dim_first(h0, dim, size)                                   # [V, *shape of h0]
    aligned = states.reshape(size, *([1] * (len(state_shape) - states.dim())), *states.shape[1:])
    return fold_vmap_dim(aligned.expand(state_shape))
