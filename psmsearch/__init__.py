"""psmsearch: search the design space of Prefix-Scannable Models.

Public API for plugin authors::

    from psmsearch import hookimpl, Encoder, Aggregator, Head, HyperParameter, ComponentContext
"""

from psmsearch.components import Aggregator, ComponentContext, Encoder, Head, HyperParameter
from psmsearch.hookspecs import hookimpl
from psmsearch.scan import OnlineScan, prefix_scan

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ComponentContext",
    "Encoder",
    "Head",
    "HyperParameter",
    "OnlineScan",
    "hookimpl",
    "prefix_scan",
    "__version__",
]
