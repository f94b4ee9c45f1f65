"""The publisher process: maps in on stdin, reports out on stdout (see producer.publisher_process).

Input is a stream of msgpack frames: first ``["settings", json]``, then ``["map", ...]`` and
``["packed", payload]`` (producer.publisher_process.map_frame), ``["collected", ids]``,
``["resend", ids]`` and last ``["close"]``. Output is a stream of ``[maps published so far,
last publish error or None]``, the first one as soon as it is ready. At ``close`` or at the
end of its input (the producer's process died) it publishes what it holds, within
``flush_timeout_s``, and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import msgpack

from producer.celery_config import make_celery
from producer.errors import BrokerError
from producer.publisher import BackgroundPublisher
from producer.publisher_process import message_from_frame
from producer.redelivery import KeptPayloads
from producer.sender import MapSender, Outgoing
from producer.settings import Settings

log = logging.getLogger("actmap.producer")

# The producer bounds what is unsent (publish_buffer_maps); this process takes all it is given.
UNBOUNDED = 1 << 62


class Reporter:
    """Writes the publisher's progress to the producer, each time it changes."""

    def __init__(self, publisher: BackgroundPublisher[Outgoing], out_fd: int) -> None:
        self._publisher = publisher
        self._out_fd = out_fd
        self._seen: tuple[int, str | None] = (0, None)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.write(self._seen)  # ready
        self._thread = threading.Thread(target=self._run, name="actmap-publisher-reports", daemon=True)
        self._thread.start()

    def write(self, progress: tuple[int, str | None]) -> None:
        data = memoryview(msgpack.packb(list(progress)))
        with self._lock:
            while data:
                data = data[os.write(self._out_fd, data) :]

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            progress = self._publisher.wait_for_progress(self._seen, timeout_s=0.5)
            if progress != self._seen:
                self._seen = progress
                try:
                    self.write(progress)
                except BrokenPipeError:
                    return  # the producer is gone; what is left is published at end of input


def main() -> None:
    # Reports go to the real stdout; anything else that prints goes to stderr, not into them.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    # Ctrl-C in a terminal reaches the whole process group: the producer's exit (its atexit
    # close) ends this process once it has published, not the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s actmap publisher process: %(message)s")
    producer_input = Input(sys.stdin.fileno())
    kind, settings_json = producer_input.next_frame() or ("", "")
    if kind != "settings":
        sys.exit("actmap publisher process: expected its settings first")
    settings = Settings.model_validate_json(settings_json)
    app = make_celery(settings, "actmap-publisher")
    # Maps lost by the broker go out again straight away (rare, and the broker was just idle).
    sender = MapSender(settings, app, resend=lambda payloads: sender.send(payloads))
    publisher: BackgroundPublisher[Outgoing] = BackgroundPublisher(
        sender.send, capacity=UNBOUNDED, batch_size=settings.batch_size, linger_s=settings.publish_linger_s
    )
    reporter = Reporter(publisher, out_fd)
    # Resends wait on the broker (up to publish_timeout_s while it is down): not in this
    # thread, which must go on reading the pipe, or the producer's submit would wait for it.
    resends = ThreadPoolExecutor(1, thread_name_prefix="actmap-resend")
    code = 0
    while (frame := producer_input.next_frame()) is not None:
        try:
            if frame[0] == "close":
                break
            _handle(frame, publisher, sender, resends)
        except (TypeError, ValueError, IndexError, KeyError) as exc:  # not a frame the producer writes
            log.error(
                "the producer's input is corrupt (%s: %s); publishing the maps before it, then exiting",
                type(exc).__name__,
                exc,
            )
            code = 1
            break
    try:
        publisher.close(settings.flush_timeout_s)
    except BrokerError as exc:
        log.error("exiting with maps unpublished: %s", exc)
        code = 1
    resends.shutdown(wait=True)
    reporter.stop()
    with contextlib.suppress(BrokenPipeError):
        reporter.write(publisher.wait_for_progress((-1, None), timeout_s=0))
    app.close()
    sender.close()
    sys.exit(code)


def _handle(
    frame: list[Any], publisher: BackgroundPublisher[Outgoing], sender: MapSender, resends: Executor
) -> None:
    kind = frame[0]
    if kind == "map":
        publisher.put(message_from_frame(frame), timeout_s=0)
    elif kind == "packed":
        publisher.put(frame[1], timeout_s=0)
    elif kind == "collected" and sender.kept is not None:
        sender.kept.collected(frame[1])
    elif kind == "resend" and sender.kept is not None:
        resends.submit(_resend, sender.kept, frame[1])


def _resend(kept: KeptPayloads, result_ids: list[str]) -> None:
    try:
        kept.resend(result_ids)
    except BrokerError as exc:
        log.warning("could not send lost maps again: %s", exc)


class Input:
    """The producer's frames, read so that its writes seldom have to wake this process.

    A write to a pipe whose reader waits in the kernel wakes the reader, on another CPU: on
    a VM an interrupt between virtual CPUs, paid by the writer, the caller's ``submit``,
    for every map. So while maps flow this process does not wait on the pipe: it looks at
    it every ``POLL_S``; after ``QUIET_S`` without input it waits on it again, and only the
    first map of the next burst pays for the wakeup.
    """

    POLL_S = 0.002
    QUIET_S = 0.1

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._frames = msgpack.Unpacker(max_buffer_size=1 << 31)
        self._last_input = 0.0

    def next_frame(self) -> list[Any] | None:
        """The next frame, or None at the end of the input."""
        while True:
            try:
                return self._frames.unpack()  # type: ignore[no-any-return]
            except msgpack.OutOfData:
                pass
            quiet = time.monotonic() - self._last_input > self.QUIET_S
            if not quiet and not select.select([self._fd], [], [], 0)[0]:
                time.sleep(self.POLL_S)
                continue
            data = os.read(self._fd, 1 << 20)
            if not data:
                return None
            self._last_input = time.monotonic()
            self._frames.feed(data)


if __name__ == "__main__":
    main()
