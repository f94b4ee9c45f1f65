"""The background publisher in a process of its own (``background_publisher = "process"``).

A publisher thread shares the caller's GIL: a loop that spins in Python between maps
gets it back only when the thread lets go, which shows in ``submit``'s p99. Here the
caller's process runs no thread of ours: ``put`` writes the quantized map to a pipe (one
copy, one system call) and returns; ``python -m producer.publisher_child`` reads it, packs
it and publishes it in batches with the same ``BackgroundPublisher`` and ``MapSender`` the
thread uses, and reports back how many maps the broker has taken.

Same guarantees as the thread: what ``put`` accepted is published or reported; at most
``publish_buffer_maps`` unsent, then ``put`` blocks and raises BrokerError after its
timeout; ``flush`` waits for every map put so far. If this process dies, the publisher
process still publishes what it holds, then exits. If the publisher process dies, the
next call raises BrokerError saying how many maps it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from producer.errors import BrokerError, ConfigError
from producer.publisher import buffer_full_error, closed_error, discarded_error, unsent_error
from producer.sender import Outgoing
from producer.settings import Settings
from producer.signals import signals_held
from producer.wire import MapMessage

# The pipe's buffer (Linux): a few maps in flight while the publisher process reads.
PIPE_BYTES = 1 << 20
# How long the publisher process may take to start (import Celery, read its settings).
START_TIMEOUT_S = 60.0


def map_frame(message: Outgoing) -> tuple[bytes, memoryview]:
    """The msgpack of ``[kind, *fields, data]``, in two pieces: the map's bytes are not copied.

    ``["map", run_id, image_id, name, colormap, fade, dtype, shape, data]``, or ``["packed",
    data]`` for a map packed already (sent again by producer.redelivery).
    """
    fields: list[Any]
    if isinstance(message, bytes):
        fields, data = ["packed"], memoryview(message)
    else:
        array = np.ascontiguousarray(message.array)
        fields = [
            "map",
            message.run_id,
            message.image_id,
            message.name,
            message.colormap,
            message.fade_low_activation,
            array.dtype.str,
            list(array.shape),
        ]
        data = array.data.cast("B")
    # The fields packed as a msgpack fixarray (one byte of header: at most 15 items) made one
    # item longer, then a bin 32 header: the data follows as it is.
    packed = msgpack.packb(fields)
    head = bytes([packed[0] + 1]) + packed[1:]
    return head + b"\xc6" + len(data).to_bytes(4, "big"), data


def message_from_frame(frame: list[Any]) -> MapMessage:
    _, run_id, image_id, name, colormap, fade, dtype, shape, data = frame
    array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    return MapMessage(run_id, image_id, name, array, colormap, fade)


class ProcessPublisher:
    def __init__(self, settings: Settings) -> None:
        self._capacity = settings.publish_buffer_maps
        self._lock = threading.Lock()
        self._accepted = 0  # maps put so far
        self._published = 0  # maps the broker has taken so far, as last reported
        self._last_error: str | None = None
        self._closing = False
        self._reports = 0  # reports read from the publisher process
        self._status = msgpack.Unpacker()
        self._child = subprocess.Popen(
            _child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._to_child: IO[bytes] = self._child.stdin  # type: ignore[assignment]
        self._from_child: IO[bytes] = self._child.stdout  # type: ignore[assignment]
        # Not on Linux, or over the system's limit, the default pipe works, with more wakeups.
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(self._to_child.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(self._from_child.fileno(), False)
        # Written in pieces as room comes (_write_frame): a frame must not be cut by a signal.
        os.set_blocking(self._to_child.fileno(), False)
        # The longest a frame may take to go into the pipe: the publisher process reads it
        # within milliseconds (nothing it does in between waits on the broker) unless it is stuck.
        self._write_timeout_s = settings.flush_timeout_s
        # Its first report says it is ready: a publisher that cannot start fails here, not later.
        try:
            with self._lock:
                self._write(["settings", settings.model_dump_json()])
                ready = self._wait_for(lambda: self._reports > 0, START_TIMEOUT_S)
        except BrokerError:  # it exited
            ready = False
        if not ready:
            self._child.kill()
            code = self._child.wait()
            self._to_child.close()
            self._from_child.close()
            raise ConfigError(
                f"the publisher process did not start (exit code {code}, -9: it did not answer within "
                f"{START_TIMEOUT_S:g} s); its error output is above"
            )

    @property
    def unsent(self) -> int:
        """Maps accepted but not yet taken by the broker."""
        with self._lock:
            if not self._from_child.closed:
                self._read_reports(timeout_s=0)
            return self._accepted - self._published

    def put(self, message: Outgoing, timeout_s: float) -> None:
        """Hand one map to the publisher process; blocks while ``publish_buffer_maps`` are unsent."""
        frame = map_frame(message)
        with self._lock:
            if self._closing:
                raise closed_error()
            if self._accepted - self._published >= self._capacity and not self._wait_for(
                lambda: self._accepted - self._published < self._capacity, timeout_s
            ):
                raise buffer_full_error(self._capacity, timeout_s, self._last_error)
            self._write_frame(frame, then=self._count_accepted)

    def _count_accepted(self) -> None:
        self._accepted += 1

    def collected(self, result_ids: list[str]) -> None:
        """Tell the publisher process it may forget these maps (kept for producer.redelivery)."""
        if result_ids:
            with self._lock:
                self._write(["collected", result_ids])

    def resend(self, result_ids: Iterable[str]) -> int:
        """Ask the publisher process to send these maps again; returns how many were asked for."""
        ids = list(result_ids)
        with self._lock:
            self._write(["resend", ids])
        return len(ids)

    def flush(self, timeout_s: float | None) -> None:
        """Wait until every map put so far is published; BrokerError if ``timeout_s`` passes first."""
        with self._lock:
            target = self._accepted
            if not self._wait_for(lambda: self._published >= target, timeout_s):
                raise unsent_error(
                    target - self._published, timeout_s, "by the publisher process", self._last_error
                )

    def close(self, timeout_s: float | None) -> None:
        """Flush, then end the publisher process; maps unsent after ``timeout_s``: BrokerError, discarded."""
        flushed = False
        try:
            self.flush(timeout_s)
            flushed = True
        except BrokerError as exc:
            if self._child.poll() is not None:  # it exited: that is the error to report
                raise
            unsent = self._accepted - self._published
            raise discarded_error(unsent, timeout_s, self._last_error) from exc
        finally:
            with self._lock:
                self._closing = True
                # Said, not only by the end of input: a process forked from this one (a data
                # loader's workers, say) holds the pipe open and would keep that from coming.
                with contextlib.suppress(BrokerError):
                    self._write(["close"])
            self._to_child.close()
            try:
                # Flushed, it has nothing left to do; not flushed, the maps were reported unsent.
                self._child.wait(timeout=10.0 if flushed else 0.1)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._from_child.close()

    def _write(self, frame: list[Any]) -> None:
        self._write_frame((msgpack.packb(frame),))

    def _write_frame(
        self, pieces: Iterable[bytes | memoryview], then: Callable[[], None] | None = None
    ) -> None:
        """Write a frame whole, then call ``then``, within ``flush_timeout_s``.

        A map larger than the pipe goes in as the publisher process reads it. A Ctrl-C before
        the frame's first byte acts at once; after it, it waits for the frame and ``then``
        (the publisher process reads within milliseconds): "stop after this map".
        """
        if self._to_child.closed:
            raise closed_error()
        fd = self._to_child.fileno()
        rest = [memoryview(piece).cast("B") for piece in pieces]
        deadline = time.monotonic() + self._write_timeout_s
        while True:
            with signals_held():
                try:
                    written = _write_some(fd, rest)
                    if written:  # begun: finished before any signal acts
                        while rest := _unwritten(rest, written):
                            if not _wait_writable(fd, deadline):
                                raise self._stuck()
                            written = _write_some(fd, rest)
                        if then is not None:
                            then()
                        return
                except BrokenPipeError:
                    raise self._gone() from None
            # The pipe is full and nothing is written: wait for room, signals acting as usual.
            if not _wait_writable(fd, deadline):
                raise BrokerError(
                    f"the publisher process read nothing for {self._write_timeout_s:g} s; "
                    f"{self._accepted - self._published} map(s) unsent; it may be stuck"
                )

    def _stuck(self) -> BrokerError:
        """End a publisher process that stopped reading half-way through a frame: it can read no further."""
        self._child.kill()
        code = self._child.wait()
        return BrokerError(
            f"the publisher process stopped reading for {self._write_timeout_s:g} s half-way through a "
            f"map and was killed (code {code}); {self._accepted - self._published} map(s) it held were "
            f"not published; create a new Producer"
        )

    def _wait_for(self, condition: Callable[[], bool], timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not condition():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._read_reports(timeout_s=remaining)
        return True

    def _read_reports(self, timeout_s: float | None) -> None:
        """Read what the publisher process reported, waiting up to ``timeout_s`` for a report."""
        if self._from_child.closed:
            raise closed_error()
        fd = self._from_child.fileno()
        if not select.select([fd], [], [], timeout_s)[0]:
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise self._gone()
        self._take_reports(data)

    def _take_reports(self, data: bytes) -> None:
        self._status.feed(data)
        for published, error in self._status:
            self._published, self._last_error = published, error
            self._reports += 1

    def _gone(self) -> BrokerError:
        code = self._child.wait()
        # Its last reports, if it wrote any before it exited: what it published is not lost.
        with contextlib.suppress(OSError, ValueError):
            while data := os.read(self._from_child.fileno(), 1 << 16):
                self._take_reports(data)
        return BrokerError(
            f"the publisher process exited (code {code}); {self._accepted - self._published} map(s) "
            f"it held were not published; create a new Producer"
        )


def _wait_writable(fd: int, deadline: float) -> bool:
    """Wait until the pipe has room; False if ``deadline`` (``time.monotonic()``) passes first."""
    while not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
        if time.monotonic() >= deadline:
            return False
    return True


def _write_some(fd: int, pieces: list[memoryview]) -> int:
    """As many of ``pieces``' bytes as the pipe takes now (a non-blocking write)."""
    try:
        return os.writev(fd, pieces)
    except BlockingIOError:
        return 0


def _unwritten(pieces: list[memoryview], written: int) -> list[memoryview]:
    """What is left of ``pieces`` after their first ``written`` bytes."""
    for index, piece in enumerate(pieces):
        if written < len(piece):
            return [piece[written:], *pieces[index + 1 :]]
        written -= len(piece)
    return []


def _child_command() -> list[str]:
    """``python -P`` (no current folder on its path) running the child, this package importable.

    Its folder is appended to the path, not prepended: an installed actmap wins, and a
    checkout that is not installed still works.
    """
    root = str(Path(__file__).resolve().parent.parent)
    code = "import sys; sys.path.append(sys.argv[1]); from producer.publisher_child import main; main()"
    return [sys.executable, "-P", "-c", code, root]
