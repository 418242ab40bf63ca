"""Stopping a command on Ctrl-C or SIGTERM, including trials running in worker threads.

Python delivers a signal's ``KeyboardInterrupt`` to the main thread only. A search with
``--jobs N`` runs its trials in threads, so the first signal also sets :data:`STOP`, which the
trainer checks at every step (:func:`raise_if_stopping`): each running trial then stops within a
step and closes its run as interrupted. A second signal only says that the command is stopping
(raising again would break the threads' clean-up); a third exits at once, leaving any trial still
running to ``--resume``, which finds it by its missing heartbeat.

A signal can arrive while the main thread runs a finalizer (``__del__``, a weakref callback, such
as SQLAlchemy's): Python swallows an exception raised there and prints it as "Exception ignored".
The ``KeyboardInterrupt`` is then delivered again at the main thread's next step outside it.

A signal can also arrive while the main thread is inside a database call (Optuna's or MLflow's SQLite
storage): raised there, the ``KeyboardInterrupt`` can leave a connection with its transaction open,
holding SQLite's lock, and the clean-up that marks the trial interrupted, and the heartbeat thread,
then wait on that lock. Code in :func:`deferred` blocks gets the ``KeyboardInterrupt`` when the
outermost block ends instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOP = threading.Event()
_signals_seen = 0
_redeliver = False  # a finalizer swallowed the first signal's KeyboardInterrupt: raise it again
_default_unraisable_hook = sys.unraisablehook
_deferring = 0  # depth of deferred() blocks the main thread is in
_pending: str | None = None  # the signal whose KeyboardInterrupt waits for the outermost block to end


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop's ``KeyboardInterrupt`` back until the block ends (main thread; elsewhere a no-op).

    For calls that must not be cut in the middle, such as a database transaction; :data:`STOP` is set
    at once all the same, so worker threads stop as usual.
    """
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _pending is not None:
            name, _pending = _pending, None
            raise KeyboardInterrupt(name)


def raise_if_stopping() -> None:
    """Raise ``KeyboardInterrupt`` in any thread once a stop was requested."""
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


def _interrupt(name: str) -> None:
    """Raise the stop's ``KeyboardInterrupt`` now, or at the end of the :func:`deferred` block the main thread is in."""
    global _pending
    if _deferring:
        _pending = name
        return
    raise KeyboardInterrupt(name)


def _handle(signum: int, _frame: Any) -> None:
    global _signals_seen, _redeliver
    name = signal.Signals(signum).name
    if _redeliver:
        _redeliver = False
        _interrupt(name)
        return
    _signals_seen += 1
    if _signals_seen == 1:
        STOP.set()
        _interrupt(name)
        return
    if _signals_seen == 2:
        print(f"{name}: stopping; what is running is being closed (a search marks its trials interrupted; "
              "once more to exit at once)", file=sys.stderr, flush=True)
        return
    print(f"{name}: exiting now; --resume recovers trials left running", file=sys.stderr, flush=True)
    os._exit(130)


def _unraisable(unraisable: Any) -> None:
    """Deliver a stop's ``KeyboardInterrupt`` that a finalizer swallowed again (see above); others as usual."""
    global _redeliver
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and STOP.is_set():
        _redeliver = True
        # A real signal to the main thread, a moment later: once the finalizer has returned, and it wakes
        # a blocking wait (a signal simulated in this thread would run _handle here, inside it).
        timer = threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    _default_unraisable_hook(unraisable)


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGTERM, _handle)
        sys.unraisablehook = _unraisable
