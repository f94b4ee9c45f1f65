"""Holding a Ctrl-C for a step that must be whole (producer.signals)."""

from __future__ import annotations

import _thread
import signal
import threading
import types

import pytest

from producer import signals


def sigint_blocked() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())


def test_a_ctrl_c_inside_the_block_acts_once_the_block_is_done() -> None:
    done = False
    with pytest.raises(KeyboardInterrupt), signals.signals_held():
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        done = True
    assert done
    assert not sigint_blocked()


def test_a_ctrl_c_that_comes_as_the_block_begins_still_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The KeyboardInterrupt of a SIGINT whose handler ran while the mask was being set is
    # raised as pthread_sigmask returns: stood in for by interrupt_main from within the call.
    def pthread_sigmask(how: int, mask: object) -> set[signal.Signals]:
        previous = signal.pthread_sigmask(how, mask)  # type: ignore[arg-type]
        if how == signal.SIG_BLOCK and mask:
            _thread.interrupt_main()
        return previous

    monkeypatch.setattr(
        signals, "signal", types.SimpleNamespace(**{**vars(signal), "pthread_sigmask": pthread_sigmask})
    )
    with pytest.raises(KeyboardInterrupt), signals.signals_held():
        pass
    monkeypatch.undo()
    assert not sigint_blocked()


def test_a_signal_blocked_before_the_block_stays_blocked_after_it() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with signals.signals_held():
            pass
        assert sigint_blocked()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
