"""Stopping a command on Ctrl-C or SIGTERM, including trials running in worker threads.

Python delivers a signal's ``KeyboardInterrupt`` to the main thread only. A search with
``--jobs N`` runs its trials in threads, so the first signal also sets :data:`STOP`, which the
trainer checks at every step (:func:`raise_if_stopping`): each running trial then stops within a
step and closes its run as interrupted. A second signal only says that the command is stopping
(raising again would break the threads' clean-up); a third exits at once, leaving any trial still
running to ``--resume``, which finds it by its missing heartbeat.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

STOP = threading.Event()
_signals_seen = 0


def raise_if_stopping() -> None:
    """Raise ``KeyboardInterrupt`` in any thread once a stop was requested."""
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


def _handle(signum: int, _frame: Any) -> None:
    global _signals_seen
    _signals_seen += 1
    name = signal.Signals(signum).name
    if _signals_seen == 1:
        STOP.set()
        raise KeyboardInterrupt(name)
    if _signals_seen == 2:
        print(f"{name}: stopping; running trials are being closed as interrupted (once more to exit at once)",
              file=sys.stderr, flush=True)
        return
    print(f"{name}: exiting now; --resume recovers trials left running", file=sys.stderr, flush=True)
    os._exit(130)


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGTERM, _handle)
