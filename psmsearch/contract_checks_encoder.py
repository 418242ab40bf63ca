"""Contract checks of an encoder: the shapes ``state_shape`` promises, features computed token by
token (streaming computes them one token at a time), and gradients that reach the input."""

from __future__ import annotations

import torch

from psmsearch import states as S
from psmsearch.contract_assembly import ATOL, BATCH, CHUNK, _Assembly, _require
from psmsearch.contract_measures import _gradcheck, _max_diff, _shapes


def _encoder_shapes(a: _Assembly) -> str:
    x = a.inputs(3, 1)  # [B, 3, c, d]
    f = a.encoder.features(x)
    for leaf in S.leaves(f):
        _require(list(leaf.shape[:3]) == [BATCH, 3, CHUNK], f"features leaf shape {list(leaf.shape)} does not start with [B, N, c] = {[BATCH, 3, CHUNK]}")
    state = a.encoder.summarize(f)
    shape = a.encoder.state_shape
    expected = [[BATCH, 3, *s] for s in (shape if shape and isinstance(shape[0], tuple) else (shape,))]
    _require(_shapes(state) == expected, f"summarize gave {_shapes(state)}, state_shape promises {expected}")
    return f"state {_shapes(state)}"


def _encoder_token_local(a: _Assembly) -> str:
    x = a.inputs(1, 2)[:, 0]  # [B, c, d]
    whole = a.encoder.features(x)
    for j in range(CHUNK):
        single = a.encoder.features(x[:, j : j + 1], offset=j)
        diff = _max_diff(S.take(whole, 1, slice(j, j + 1)), single)
        _require(diff <= ATOL, f"features of token {j} alone (offset={j}) differ from the whole chunk's by {diff:.3g}")
    bumped = x.clone()
    bumped[:, 0] += 1.0
    diff = _max_diff(S.take(a.encoder.features(bumped), 1, slice(1, None)), S.take(whole, 1, slice(1, None)))
    _require(diff <= ATOL, f"changing token 0 changed the features of later tokens by {diff:.3g}")
    return f"{CHUNK} positions"


def _encoder_gradients(a: _Assembly) -> str:
    x = a.inputs(2, 3).requires_grad_(True)
    state = a.encoder.summarize(a.encoder.features(x))
    total = sum(leaf.double().square().sum() for leaf in S.leaves(state))
    (grad,) = torch.autograd.grad(total, x)
    _require(bool(torch.isfinite(grad).all()), "gradient w.r.t. the input has non-finite values")
    _require(grad.abs().sum().item() > 0, "gradient w.r.t. the input is identically zero")
    checked = _gradcheck(a.encoder, lambda enc, x: (*S.leaves(enc.features(x)), *S.leaves(enc.summarize(enc.features(x)))),
                         [a.inputs(2, 3)], "features and summarize")
    return f"finite, non-zero; {checked}"
