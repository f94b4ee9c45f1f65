"""Keeping a Ctrl-C from landing half-way through a step that must be whole.

A Ctrl-C in the caller's main thread (a notebook's "interrupt" too) raises KeyboardInterrupt
wherever that thread is, and the caller may catch it and go on. The publisher process's
pipe must never hold half a map, so its writes hold the signal; it acts once they are done.
(The publisher thread needs no hold: its buffer's one append is whole or not at all, and
it counts what is unsent from the buffer.)
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

# SIGINT only: other signals with a Python handler mostly end the program. The hold costs ~6 µs
# per submit on this project's VM, ~2.5 µs more for each further signal (two system calls, and
# Python returns the old mask as a set of enums).
HELD_SIGNALS = {signal.SIGINT}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """HELD_SIGNALS sent meanwhile to this thread wait (in the kernel) until the block ends."""
    previous = None
    try:
        # Inside the try: a Ctrl-C that came while the block began is raised as the call
        # returns, before ``previous`` is set, and the block must end all the same.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        yield
    finally:
        if previous is None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        else:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
