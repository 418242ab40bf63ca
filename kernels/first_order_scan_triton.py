"""Triton kernels for :func:`psmsearch.kernels.first_order_scan`.

Layout: the state ``[*S]`` is flattened to ``N`` columns, so ``b`` and ``h`` are
``[B, T, N]`` (contiguous, a row of ``N`` per step). Every program owns one batch
entry and ``BLOCK_N`` columns and walks the time axis in tiles of ``BLOCK_T``
steps: it loads a ``[BLOCK_T, BLOCK_N]`` tile of gates and inputs, scans the tile
with ``tl.associative_scan`` over the affine combine, applies the carry from the
previous tile and stores; the next tile's loads are issued before the current
tile's scan. Each element is read and written once, with float32
arithmetic whatever the storage dtype.

A gate that broadcasts over the state (one per head, one per key channel) is
read through a per-column offset table (``a_cols``), so no broadcast copy of the
gates is made. Its gradient is written per state element and reduced in
PyTorch by the caller.

Backward (both directions): in scan order ``p``,
``g_p = dh_p + a_{p+1} g_{p+1}`` runs the same tile scan from the end,
and the same kernel writes ``db = g``, ``da_p = g_p h_{p-1}`` and ``dh0 = a_0 g_0``.

A second forward kernel, :func:`_scan_fwd_coarse_kernel`, cuts each tile into
groups of consecutive steps that are walked in order (one multiply-add per
element) and runs the tile-wide scan over the groups only.

On CUDA the kernel and tile shape are tuned once per problem class (see :func:`_config`);
under ``TRITON_INTERPRET=1`` a small fixed tile keeps the interpreter fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _dispatch


@triton.jit
def _affine_combine(a_left, x_left, a_right, x_right):
    """``(a2, x2) ⊕ (a1, x1) = (a2 a1, a2 x1 + x2)``: left is the earlier element."""
    return a_right * a_left, a_right * x_left + x_right


@triton.jit
def _last_row(tile, rows, BLOCK_T: tl.constexpr):
    """Row ``BLOCK_T - 1`` of a ``[BLOCK_T, BLOCK_N]`` tile, as ``[BLOCK_N]``."""
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, tile, 0.0), axis=0)


@triton.jit
def _gate_columns(A_COLS, cols, col_ok, GATE_FULL: tl.constexpr):
    """Offset of each state column inside one ``[*Sa]`` gate slice (``cols`` itself for full gates)."""
    if GATE_FULL:
        offsets = cols.to(tl.int64)
    else:
        offsets = tl.load(A_COLS + cols, mask=col_ok, other=0).to(tl.int64)
    return offsets


@triton.jit
def _time_of(pos, T, REVERSE: tl.constexpr):
    """Time index (int64) of scan positions ``pos``: ``pos`` or ``T - 1 - pos``."""
    t = (T - 1 - pos) if REVERSE else pos
    return t.to(tl.int64)


@triton.jit
def _load_fwd_tile(A, X, start, rows, cols, a_cols, col_ok, T, N, stride_at, REVERSE: tl.constexpr):
    """Gates and inputs of scan positions ``start + rows`` as float32 ``[BLOCK_T, BLOCK_N]``.

    Positions past the end read as the identity ``(a, x) = (1, 0)`` so they carry the state through.
    """
    pos = start + rows
    t = _time_of(pos, T, REVERSE)
    ok = (pos < T)[:, None] & col_ok[None, :]
    a = tl.load(A + t[:, None] * stride_at + a_cols[None, :], mask=ok, other=1.0).to(tl.float32)
    x = tl.load(X + t[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return a, x


@triton.jit
def _scan_fwd_kernel(
    A, X, H0, OUT, A_COLS,
    T, N, stride_ab, stride_at,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, GATE_FULL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out_t = a_t out_{t-1} + x_t`` (or from the end when REVERSE) for one batch entry and column block.

    The next tile is loaded before the current one is scanned, so its memory
    latency overlaps the scan arithmetic.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    a_cols = _gate_columns(A_COLS, cols, col_ok, GATE_FULL)  # [BLOCK_N]
    rows = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    A += pid_b * stride_ab
    X += pid_b * T * N
    OUT += pid_b * T * N
    if HAS_H0:
        carry = tl.load(H0 + pid_b * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    a_next, x_next = _load_fwd_tile(A, X, 0, rows, cols, a_cols, col_ok, T, N, stride_at, REVERSE)
    for start in range(0, T, BLOCK_T):
        a, x = a_next, x_next  # [BLOCK_T, BLOCK_N]
        a_next, x_next = _load_fwd_tile(A, X, start + BLOCK_T, rows, cols, a_cols, col_ok, T, N,
                                        stride_at, REVERSE)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _affine_combine)
        h = x_cum + a_cum * carry[None, :]  # [BLOCK_T, BLOCK_N]
        pos = start + rows
        t = _time_of(pos, T, REVERSE)
        tl.store(OUT + t[:, None] * N + cols[None, :], h, mask=(pos < T)[:, None] & col_ok[None, :])
        carry = _last_row(h, rows, BLOCK_T)


@triton.jit
def _load_rows(A, X, pos, row_ok, cols, a_cols, col_ok, T, N, stride_at, REVERSE: tl.constexpr):
    """Gates and inputs of scan positions ``pos`` (``[GROUPS]``) as float32 ``[GROUPS, BLOCK_N]``.

    Rows where ``row_ok`` is false or ``pos`` is past the end read as the identity ``(1, 0)``.
    """
    t = _time_of(pos, T, REVERSE)
    ok = (row_ok & (pos < T))[:, None] & col_ok[None, :]
    a = tl.load(A + t[:, None] * stride_at + a_cols[None, :], mask=ok, other=1.0).to(tl.float32)
    x = tl.load(X + t[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return a, x


@triton.jit
def _scan_fwd_coarse_kernel(
    A, X, H0, OUT, A_COLS,
    T, N, stride_ab, stride_at,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, GATE_FULL: tl.constexpr,
    GROUPS: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward of :func:`_scan_fwd_kernel` with ``SUB`` consecutive steps per group walked in order.

    A tile of ``GROUPS * SUB`` steps is cut into ``GROUPS`` groups of ``SUB``
    consecutive steps. Pass 1 folds, for each group, the ``SUB`` steps of the
    group *before* it (the identity for the first), elementwise; the
    associative scan over groups then gives every group's entering state, and
    pass 2 walks each group's own steps with one multiply-add per element. The
    tile-wide scan (shuffles, shared memory) thus runs on one row in ``SUB``;
    pass 2 re-reads pass 1's rows, which the cache still holds.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    a_cols = _gate_columns(A_COLS, cols, col_ok, GATE_FULL)  # [BLOCK_N]
    groups = tl.arange(0, GROUPS) * SUB  # first step of each group within the tile  [GROUPS]
    A += pid_b * stride_ab
    X += pid_b * T * N
    OUT += pid_b * T * N
    if HAS_H0:
        carry = tl.load(H0 + pid_b * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, T, GROUPS * SUB):
        a_before = tl.full([GROUPS, BLOCK_N], 1.0, tl.float32)
        x_before = tl.zeros([GROUPS, BLOCK_N], dtype=tl.float32)
        for r in tl.static_range(SUB):
            # step r of the previous group; none before the first group (its state is the carry)
            a, x = _load_rows(A, X, start + groups - SUB + r, groups > 0, cols, a_cols, col_ok, T, N,
                              stride_at, REVERSE)
            a_before = a * a_before
            x_before = a * x_before + x
        a_cum, x_cum = tl.associative_scan((a_before, x_before), 0, _affine_combine)
        h = x_cum + a_cum * carry[None, :]  # state entering each group  [GROUPS, BLOCK_N]
        for r in tl.static_range(SUB):
            pos = start + groups + r  # [GROUPS]
            a, x = _load_rows(A, X, pos, pos >= 0, cols, a_cols, col_ok, T, N, stride_at, REVERSE)
            h = a * h + x
            t = _time_of(pos, T, REVERSE)
            tl.store(OUT + t[:, None] * N + cols[None, :], h, mask=(pos < T)[:, None] & col_ok[None, :])
        carry = tl.sum(tl.where(groups[:, None] == (GROUPS - 1) * SUB, h, 0.0), axis=0)  # last group


@triton.jit
def _load_bwd_tile(A, H, DH, start, rows, cols, a_cols, col_ok, h_init, T, N, stride_at,
                   REVERSE: tl.constexpr, NEED_DA: tl.constexpr):
    """For scan positions ``p = T-1-(start+rows)`` (descending): ``a_{p+1}``, ``dh_p``, ``h_{p-1}``.

    ``a_{p+1}`` is 0 past the end (``g_{T-1} = dh_{T-1}``); rows before position 0
    read as the identity ``(1, 0)``; ``h_{-1}`` is ``h_init``.
    """
    pos = T - 1 - (start + rows)  # [BLOCK_T]
    t = _time_of(pos, T, REVERSE)
    step = -1 if REVERSE else 1  # time of scan position p + 1 minus time of p
    ok = (pos >= 0)[:, None] & col_ok[None, :]
    next_ok = ((pos + 1) < T)[:, None] & ok
    a_next = tl.load(A + (t + step)[:, None] * stride_at + a_cols[None, :], mask=next_ok, other=0.0)
    a_next = tl.where(ok, a_next.to(tl.float32), 1.0)
    dh = tl.load(DH + t[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if NEED_DA:
        prev_ok = (pos >= 1)[:, None] & ok
        h_prev = tl.load(H + (t - step)[:, None] * N + cols[None, :], mask=prev_ok, other=0.0)
        h_prev = tl.where((pos == 0)[:, None], h_init[None, :], h_prev.to(tl.float32))
    else:
        h_prev = dh
    return a_next, dh, h_prev


@triton.jit
def _scan_bwd_kernel(
    A, H, H0, DH, DB, DA, DH0, A_COLS,
    T, N, stride_ab, stride_at,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, NEED_DA: tl.constexpr, GATE_FULL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of the scan for one batch entry and column block (see the module docstring).

    Tiles run from the last scan position to the first, the next tile's loads
    issued before the current tile's scan.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    a_cols = _gate_columns(A_COLS, cols, col_ok, GATE_FULL)
    rows = tl.arange(0, BLOCK_T)
    A += pid_b * stride_ab
    H += pid_b * T * N
    DH += pid_b * T * N
    DB += pid_b * T * N
    DA += pid_b * T * N
    if HAS_H0:
        h_init = tl.load(H0 + pid_b * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h_init = tl.zeros([BLOCK_N], dtype=tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    a_nx, dh_nx, hp_nx = _load_bwd_tile(A, H, DH, 0, rows, cols, a_cols, col_ok, h_init, T, N,
                                        stride_at, REVERSE, NEED_DA)
    for start in range(0, T, BLOCK_T):
        a_next, dh, h_prev = a_nx, dh_nx, hp_nx  # [BLOCK_T, BLOCK_N]
        a_nx, dh_nx, hp_nx = _load_bwd_tile(A, H, DH, start + BLOCK_T, rows, cols, a_cols, col_ok,
                                            h_init, T, N, stride_at, REVERSE, NEED_DA)
        a_cum, x_cum = tl.associative_scan((a_next, dh), 0, _affine_combine)
        g = x_cum + a_cum * carry[None, :]  # [BLOCK_T, BLOCK_N]
        pos = T - 1 - (start + rows)
        t = _time_of(pos, T, REVERSE)
        ok = (pos >= 0)[:, None] & col_ok[None, :]
        tl.store(DB + t[:, None] * N + cols[None, :], g, mask=ok)
        if NEED_DA:
            tl.store(DA + t[:, None] * N + cols[None, :], g * h_prev, mask=ok)
        carry = _last_row(g, rows, BLOCK_T)
    if HAS_H0:
        t_first = (T - 1) if REVERSE else 0
        a_first = tl.load(A + t_first * stride_at + a_cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DH0 + pid_b * N + cols, a_first * carry, mask=col_ok)


@dataclass(frozen=True)
class _Config:
    """A launch shape: ``block_t`` steps by ``block_n`` columns per tile.

    ``sub > 1`` (forward only) takes :func:`_scan_fwd_coarse_kernel`, whose
    groups walk ``sub`` consecutive steps each (``block_t // sub`` groups).
    """
    block_t: int
    block_n: int
    num_warps: int
    num_stages: int = 1
    sub: int = 1


_INTERPRET_CONFIG = _Config(block_t=8, block_n=16, num_warps=1)
_DEFAULT_CONFIG = _Config(block_t=64, block_n=64, num_warps=4, num_stages=2)
_CANDIDATES = (
    _DEFAULT_CONFIG,
    _Config(32, 64, 4, 2),
    _Config(64, 32, 4, 2),
    _Config(128, 32, 4, 2),
    _Config(128, 16, 4, 2),
    _Config(32, 128, 4, 2),
    _Config(128, 8, 4, 2),
    _Config(64, 16, 2, 2),
    _Config(256, 32, 8, 2),
)
_FORWARD_CANDIDATES = _CANDIDATES + (
    _Config(128, 32, 4, 1, sub=8),
    _Config(128, 16, 2, 1, sub=8),
    _Config(256, 32, 4, 1, sub=16),
    _Config(128, 64, 4, 1, sub=4),
)
_TUNE_MIN_ELEMENTS = 1 << 22
_tuned: dict[tuple, _Config] = {}
_tuning_times: dict[tuple, dict[_Config, float]] = {}


def _config(key: tuple, elements: int, launch: Callable[[_Config], None], device: torch.device,
            candidates: tuple[_Config, ...] = _CANDIDATES) -> _Config:
    """Tile shape for a launch: fixed for small problems and the interpreter, else tuned once per ``key``.

    Tuning times every candidate with CUDA events on the real arguments (the
    kernels only overwrite their outputs, so repeating a launch is harmless).
    """
    if _dispatch.interpret_enabled() or device.type != "cuda":
        return _INTERPRET_CONFIG
    if elements < _TUNE_MIN_ELEMENTS:
        return _DEFAULT_CONFIG
    if key not in _tuned:
        times = {cfg: _time_config(launch, cfg) for cfg in candidates}
        _tuning_times[key] = times
        _tuned[key] = min(candidates, key=times.__getitem__)
    return _tuned[key]


def tuning_report() -> list[dict[str, object]]:
    """Every tuning made in this process: the problem key, each candidate's time (ms, 3 launches) and the pick.

    For benchmarks: it shows how far the chosen tile shape is ahead of the others
    (``None`` marks a candidate that did not compile or fit, so the report stays valid JSON).
    """
    return [{"key": [str(part) for part in key],
             "candidates": {_config_name(cfg): (ms if math.isfinite(ms) else None) for cfg, ms in times.items()},
             "chosen": _config_name(_tuned[key])}
            for key, times in _tuning_times.items()]


def _config_name(cfg: _Config) -> str:
    sub = f" sub{cfg.sub}" if cfg.sub > 1 else ""
    return f"T{cfg.block_t}xN{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{sub}"


def _time_config(launch: Callable[[_Config], None], cfg: _Config) -> float:
    try:
        launch(cfg)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            launch(cfg)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    except Exception:  # a candidate that does not compile or fit is skipped
        return math.inf


def _gate_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Gates as stored plus the per-column offsets into one ``[*Sa]`` slice.

    Returns ``(a_contiguous, a_cols [N] int64, stride over B, stride over T)``;
    a batch or time dim of size 1 gets stride 0 (broadcast).
    """
    a_c = a.contiguous()
    trailing = a.shape[2:]
    n_trailing = math.prod(trailing)
    # contiguous: the kernels index the table as a plain array (an expanded one-element view has stride 0)
    a_cols = torch.arange(n_trailing, device=a.device).view(trailing).expand(b.shape[2:]).contiguous().view(-1)
    stride_b = a_c.stride(0) if a.shape[0] > 1 else 0
    stride_t = a_c.stride(1) if a.shape[1] > 1 else 0
    return a_c, a_cols, stride_b, stride_t


def _state_width(b: torch.Tensor) -> int:
    return math.prod(b.shape[2:])


def _grid(cfg: _Config, n: int, batch: int) -> tuple[int, int]:
    return triton.cdiv(n, cfg.block_n), batch


def scan_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Triton forward; same contract as the reference (``h`` in ``b``'s dtype)."""
    batch, steps = b.shape[:2]
    n = _state_width(b)
    b_c = b.contiguous()                                          # [B, T, *S]
    a_c, a_cols, stride_ab, stride_at = _gate_layout(a, b)
    h0_c = None if h0 is None else h0.expand(b.shape[:1] + b.shape[2:]).contiguous()  # [B, *S]
    out = _dispatch.new_output(b.shape, b.dtype, b.device)        # [B, T, *S]
    if not out.numel():  # nothing to write; an empty grid is not launched
        return out

    def launch(cfg: _Config) -> None:
        args = (a_c, b_c, h0_c if h0_c is not None else b_c, out, a_cols, steps, n, stride_ab, stride_at)
        flags = dict(HAS_H0=h0_c is not None, REVERSE=reverse, GATE_FULL=a.shape[2:] == b.shape[2:])
        if cfg.sub > 1:
            _scan_fwd_coarse_kernel[_grid(cfg, n, batch)](
                *args, **flags, GROUPS=cfg.block_t // cfg.sub, SUB=cfg.sub, BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            _scan_fwd_kernel[_grid(cfg, n, batch)](
                *args, **flags, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = ("fwd", n, batch, steps.bit_length(), a.shape[2:], b.dtype, a.dtype)
    launch(_config(key, b.numel(), launch, b.device, _FORWARD_CANDIDATES))
    return out


def scan_backward(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor,
                  reverse: bool, need_da: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Triton backward: ``(da, db, dh0)`` with ``da``/``dh0`` per state element (unreduced).

    ``db`` is float32; ``da`` is in ``a``'s dtype when ``a`` is a full gate and in
    float32 when the caller still has to reduce it over broadcast dims.
    """
    batch, steps = h.shape[:2]
    n = _state_width(h)
    a_c, a_cols, stride_ab, stride_at = _gate_layout(a, h)
    h_c, dh_c = h.contiguous(), dh.contiguous()
    h0_c = None if h0 is None else h0.expand(h.shape[:1] + h.shape[2:]).contiguous()
    da_dtype = a.dtype if a.shape == h.shape else torch.float32
    db = _dispatch.new_output(h.shape, torch.float32, h.device)
    da = _dispatch.new_output(h.shape, da_dtype, h.device) if need_da else None
    dh0 = _dispatch.new_output(h0_c.shape, torch.float32, h.device) if h0_c is not None else None
    if not h.numel():
        # No scan position: h0 reaches no output (T = 0), or there is nothing to differentiate. The
        # kernel would read the first gate of an empty table for dh0, so it is not launched.
        return da, db, (None if dh0 is None else dh0.zero_())

    def launch(cfg: _Config) -> None:
        _scan_bwd_kernel[_grid(cfg, n, batch)](
            a_c, h_c, h0_c if h0_c is not None else h_c, dh_c, db,
            da if da is not None else db, dh0 if dh0 is not None else db, a_cols,
            steps, n, stride_ab, stride_at,
            HAS_H0=h0_c is not None, REVERSE=reverse, NEED_DA=need_da,
            GATE_FULL=a.shape[2:] == h.shape[2:],
            BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    key = ("bwd", n, batch, steps.bit_length(), a.shape[2:], h.dtype, a.dtype, need_da)
    launch(_config(key, h.numel(), launch, h.device))
    return da, db, dh0
