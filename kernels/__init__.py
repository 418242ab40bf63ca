"""Shared scan kernels for Prefix-Scannable Models.

Each kernel has a PyTorch reference and a Triton implementation with the same
signature; ``backend=`` (or ``PSMSEARCH_KERNEL_BACKEND``) picks one, see
:mod:`psmsearch.kernels._dispatch`.

* :func:`first_order_scan`: ``h_t = a_t * h_{t-1} + b_t`` over the time axis, any
  state shape, scalar / diagonal / full gates.
* :func:`chunk_gated_linear_attention`: chunkwise GLA / SSD with matrix states
  and scalar or per-key-channel decays.
"""

from .chunkwise import chunk_gated_linear_attention
from .first_order_scan import first_order_scan

__all__ = ["chunk_gated_linear_attention", "first_order_scan"]
