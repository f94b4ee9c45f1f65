"""The producer: submit activation maps from the GPU loop, collect their results later.

``submit`` validates and quantizes the map; a background thread packs and publishes the maps
in batches (producer.publisher), so the loop does not wait on the broker. Rendering, encoding
and uploading happen on the workers. ``collect`` reads the results of many maps per round trip
from the result backend, keyed by run id, image id and map name, so any process that knows
the run id can collect them.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celery import states
from tqdm import tqdm

from producer.celery_config import make_celery
from producer.errors import BrokerError, CollectTimeoutError, InvalidMapError
from producer.intensity import batch_shape, batch_to_intensities, to_intensities
from producer.keys import result_id, validate_image_id, validate_map_name
from producer.publisher import BackgroundPublisher, BrokerSender
from producer.redelivery import Redelivery, RedisBrokerIdleCheck
from producer.result_poller import poll_results
from producer.results import MapResult
from producer.settings import Settings
from producer.wire import MapMessage, encode_map, validate_colormap

log = logging.getLogger("actmap.producer")

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Collected results whose kept payloads are dropped at once (producer.redelivery).
FORGET_EVERY = 1024
# A map message's bytes besides the map's, ids and name aside: field names, shape, options.
MESSAGE_FIELDS_BYTES = 256


@dataclass(frozen=True)
class PendingMap:
    """The handle ``submit`` returns: enough to collect the map's result."""

    run_id: str
    image_id: str
    name: str | None

    @functools.cached_property
    def result_id(self) -> str:
        """The id of the map's result in the result backend (computed when first asked for)."""
        return result_id(self.run_id, self.image_id, self.name)


CollectItem = PendingMap | str | tuple[str, str | None]
MapItem = tuple[str, Any] | tuple[str, Any, str | None]


class Producer:
    """Send maps to the workers and collect their results.

    ``Producer()`` reads its settings from ``ACTMAP_*`` environment variables; pass a
    ``Settings`` to override them. ``run_id`` names this run's results: give the same run id
    to a ``Producer`` in another process to collect them there.
    """

    def __init__(self, settings: Settings | None = None, *, run_id: str | None = None) -> None:
        self.settings = settings or Settings()
        self.run_id = run_id or uuid.uuid4().hex
        if not _RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"run id {self.run_id!r} is not valid; expected 1-128 of A-Z a-z 0-9 . _ -")
        self._app = make_celery(self.settings, "actmap-producer")
        self._sender = BrokerSender(self.settings, self._app)
        self._idle_check: RedisBrokerIdleCheck | None = None
        self._redelivery: Redelivery | None = None
        if self.settings.redeliver_buffer_mb > 0 and self.settings.uses_redis_broker():
            self._idle_check = RedisBrokerIdleCheck(self.settings.effective_broker_url, self.settings.queue)
            self._redelivery = Redelivery(
                self._sender.send,
                self._idle_check,
                max_bytes=self.settings.redeliver_buffer_mb << 20,
                batch_size=self.settings.batch_size,
                check_every_s=self.settings.restore_interval_s,
            )
        self._publisher: BackgroundPublisher[MapMessage] | None = None
        if self.settings.background_publish:
            self._publisher = BackgroundPublisher(
                self._publish,
                capacity=self.settings.publish_buffer_maps,
                batch_size=self.settings.batch_size,
                linger_s=self.settings.publish_linger_s,
            )
            # A script that never calls close() still gets its maps published on exit.
            atexit.register(self._close_at_exit)
        self._closed = False

    # -- submitting -------------------------------------------------------------------

    def submit(
        self,
        image_id: str,
        activation_map: Any,
        *,
        name: str | None = None,
        colormap: str = "jet",
        fade_low_activation: bool = True,
    ) -> PendingMap:
        """Queue one map and return at once. Bad input raises here, before anything is sent."""
        pending, message = self._prepare(image_id, activation_map, name, colormap, fade_low_activation)
        self._send([message])
        return pending

    def submit_many(
        self,
        maps: Iterable[MapItem],
        *,
        colormap: str = "jet",
        fade_low_activation: bool = True,
        progress: bool = False,
    ) -> list[PendingMap]:
        """Queue (image_id, map) or (image_id, map, name) items, ``batch_size`` maps per message.

        A bad item raises as ``submit`` would, with a note naming it: the maps before it are
        submitted, none after it, and the error's ``submitted`` holds their handles. It takes any
        iterable, possibly a stream too large to hold, so it cannot check every item before sending.
        """
        handles: list[PendingMap] = []
        batch: list[MapMessage] = []
        with tqdm(desc="submit", unit="map", disable=not progress) as bar:
            for index, item in enumerate(maps):
                try:
                    image_id, activation_map, name = _unpack_item(item)
                    pending, message = self._prepare(
                        image_id, activation_map, name, colormap, fade_low_activation
                    )
                except Exception as exc:
                    if batch:
                        self._send(batch)
                    exc.submitted = handles  # type: ignore[attr-defined]
                    exc.add_note(
                        f"submit_many: item {index} refused; the {len(handles)} map(s) before it are "
                        "submitted, none after it"
                    )
                    raise
                handles.append(pending)
                batch.append(message)
                if len(batch) >= self.settings.batch_size:
                    self._send(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._send(batch)
                bar.update(len(batch))
        return handles

    def submit_batch(
        self,
        image_ids: Sequence[str],
        maps: Any,
        *,
        names: Sequence[str | None] | None = None,
        colormap: str = "jet",
        fade_low_activation: bool = True,
        progress: bool = False,
    ) -> list[PendingMap]:
        """Queue a (B, H, W) or (B, 1, H, W) batch of maps, ``batch_size`` maps per message.

        Checked and quantized in one operation on the batch's own device, copied to the host
        once. Anything bad (an id, a name, an option, any map) raises before anything is sent.
        """
        count = batch_shape(maps)[0]
        image_ids, names = self._check_identities(image_ids, names, count)
        self._check_options(colormap, fade_low_activation)
        intensities = batch_to_intensities(maps, max_pixels=self.settings.max_pixels, image_ids=image_ids)
        for image_id, name in zip(image_ids, names, strict=True):
            self._check_message_size(intensities.shape[1:], image_id, name)
        if self._publisher is not None and (intensities is maps or not intensities.flags.owndata):
            intensities = intensities.copy()  # the caller's memory, as in _prepare
        identities = list(zip(image_ids, names, strict=True))
        messages = [
            MapMessage(self.run_id, image_id, name, plane, colormap, fade_low_activation)
            for (image_id, name), plane in zip(identities, intensities, strict=True)
        ]
        with tqdm(total=count, desc="submit", unit="map", disable=not progress) as bar:
            for start in range(0, count, self.settings.batch_size):
                chunk = messages[start : start + self.settings.batch_size]
                self._send(chunk)
                bar.update(len(chunk))
        return [PendingMap(self.run_id, image_id, name) for image_id, name in identities]

    @classmethod
    def _check_identities(
        cls, image_ids: Sequence[str], names: Sequence[str | None] | None, count: int
    ) -> tuple[list[str], list[str | None]]:
        """A batch's image ids and names, one of each per map, checked as submit checks them."""
        ids = list(image_ids)
        all_names: list[str | None] = [None] * count if names is None else list(names)
        for what, given in (("image ids", ids), ("names", all_names)):
            if len(given) != count:
                raise InvalidMapError(
                    f"submit_batch received {len(given)} {what} for a batch of {count} maps; expected {count}"
                )
        for index, (image_id, name) in enumerate(zip(ids, all_names, strict=True)):
            try:
                cls._check_identity(image_id, name)
            except Exception as exc:
                exc.add_note(f"submit_batch: map {index} refused; nothing is submitted")
                raise
        return ids, all_names

    def _send(self, messages: Sequence[MapMessage]) -> None:
        if self._publisher is None:
            self._publish(messages)
            return
        for message in messages:
            self._publisher.put(message, timeout_s=self.settings.publish_timeout_s)

    def _publish(self, messages: Sequence[MapMessage]) -> None:
        """Pack and publish maps in one message: in the publisher's thread, or the caller's."""
        self._sender.send([self._pack(message) for message in messages])

    def _pack(self, message: MapMessage) -> bytes:
        payload = encode_map(message, level=self.settings.png_compress_level)
        if self._redelivery is not None:
            self._redelivery.keep(result_id(message.run_id, message.image_id, message.name), payload)
        return payload

    def _prepare(
        self, image_id: str, activation_map: Any, name: str | None, colormap: str, fade: bool
    ) -> tuple[PendingMap, MapMessage]:
        """Everything that can refuse a map, and its quantization: the caller's thread's share."""
        self._check_identity(image_id, name)
        self._check_options(colormap, fade)
        intensities = to_intensities(activation_map, max_pixels=self.settings.max_pixels)
        self._check_message_size(intensities.shape, image_id, name)
        if self._publisher is not None and (intensities is activation_map or not intensities.flags.owndata):
            # The caller's own memory (a uint8 array, a CPU tensor): it may be reused as soon as
            # submit returns, and the thread packs the map later. Quantized floats are already a copy.
            intensities = intensities.copy()
        return PendingMap(self.run_id, image_id, name), MapMessage(
            self.run_id, image_id, name, intensities, colormap, fade
        )

    @staticmethod
    def _check_identity(image_id: str, name: str | None) -> None:
        validate_image_id(image_id)
        validate_map_name(name)

    @staticmethod
    def _check_options(colormap: str, fade: bool) -> None:
        validate_colormap(colormap)
        if not isinstance(fade, bool):
            raise InvalidMapError(f"fade_low_activation must be a bool, received {type(fade).__name__}")

    def _check_message_size(self, shape: tuple[int, ...], image_id: str, name: str | None) -> None:
        largest = _largest_message_bytes(shape, self.run_id, image_id, name)
        if largest > self.settings.max_message_bytes:
            # Refused here: a worker could only refuse the message unread, unable to say whose map it was.
            raise InvalidMapError(
                f"map {image_id!r} ({shape[0]} x {shape[1]}) can make a map message "
                f"of up to {largest} bytes; a map message holds at most "
                f"{self.settings.max_message_bytes} (ACTMAP_MAX_MESSAGE_BYTES, the workers' too)"
            )

    # -- collecting -------------------------------------------------------------------

    def collect(
        self,
        maps: Iterable[CollectItem],
        *,
        timeout: float | None = 60.0,
        poll_interval_s: float = 0.1,
        progress: bool = False,
    ) -> list[MapResult]:
        """One result per item, in the order given: a stored map or its error.

        Items are ``PendingMap`` handles, image ids, or (image_id, name) pairs of this
        producer's run. Raises CollectTimeoutError, saying how many are still pending and
        carrying the results that did arrive, if ``timeout`` seconds pass first.
        """
        wanted = [self._pending(item) for item in maps]
        deadline = None if timeout is None else time.monotonic() + timeout
        unpublished = self._publish_buffered(timeout, deadline)
        found: dict[str, dict[str, Any]] = {}
        ids = list(dict.fromkeys(p.result_id for p in wanted))  # submission order, each once
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            with tqdm(total=len(ids), desc="collect", unit="map", disable=not progress) as bar:
                for rid, meta in self._poll(ids, remaining, poll_interval_s):
                    found[rid] = meta
                    bar.update(1)
        except TimeoutError as exc:
            pending = len(ids) - len(found)
            cause = unpublished or exc.__cause__  # maps the broker did not take, or a result backend down
            error = CollectTimeoutError(
                f"{pending} of {len(ids)} map results still pending after {timeout:g} s (run {self.run_id})"
                + (f"; {cause}" if cause else ""),
                pending=pending,
                total=len(ids),
            )
            error.results = [_to_result(p, found.get(p.result_id)) for p in wanted]
            raise error from cause
        return [_to_result(p, found[p.result_id]) for p in wanted]

    def _publish_buffered(self, timeout: float | None, deadline: float | None) -> BrokerError | None:
        """Flush within collect's own timeout: a map still in the buffer has no result to wait for.

        Returns the BrokerError of maps still unsent when that time is up (collect then says so
        in its CollectTimeoutError); one that comes before (a closed producer) is raised.
        """
        if self._publisher is None:
            return None
        try:
            self._publisher.flush(timeout)
        except BrokerError as exc:
            if deadline is None or time.monotonic() < deadline:
                raise
            return exc
        return None

    def _poll(
        self, ids: list[str], timeout: float | None, interval_s: float
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        # Reads a window of the oldest pending ids per poll, not all of them (producer.result_poller).
        redelivery = self._redelivery
        collected: list[str] = []
        try:
            for rid, meta in poll_results(
                self._app.backend,
                ids,
                timeout=timeout,
                interval_s=interval_s,
                between_polls=None if redelivery is None else redelivery.check,
            ):
                if redelivery is not None:
                    collected.append(rid)
                    if len(collected) >= FORGET_EVERY:
                        self._forget(collected)
                        collected = []
                yield rid, meta
        finally:
            self._forget(collected)

    def _forget(self, result_ids: list[str]) -> None:
        """Drop the kept payloads of maps whose results are collected (producer.redelivery)."""
        if self._redelivery is not None:
            self._redelivery.collected(result_ids)

    def _pending(self, item: CollectItem) -> PendingMap:
        if isinstance(item, PendingMap):
            return item
        image_id, name = (item, None) if isinstance(item, str) else item
        validate_image_id(image_id)
        validate_map_name(name)
        return PendingMap(self.run_id, image_id, name)

    @property
    def unsent(self) -> int:
        """Maps submitted but not yet taken by the broker (0 without background publishing)."""
        return 0 if self._publisher is None else self._publisher.unsent

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every map submitted so far is published (``flush_timeout_s`` by default).

        Raises BrokerError, saying how many maps are unsent, if the broker does not take
        them in time; they stay buffered and the publisher keeps retrying.
        """
        if self._publisher is not None:
            self._publisher.flush(self.settings.flush_timeout_s if timeout is None else timeout)

    def close(self) -> None:
        """Publish what is buffered (BrokerError if it cannot within ``flush_timeout_s``), then disconnect."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            if self._publisher is not None:
                self._publisher.close(self.settings.flush_timeout_s)
        finally:
            self._app.close()
            if self._idle_check is not None:
                self._idle_check.close()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except BrokerError as exc:
            log.error("exiting with maps unpublished: %s", exc)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _largest_message_bytes(shape: tuple[int, ...], run_id: str, image_id: str, name: str | None) -> int:
    """The most bytes a map's message can take: ISA-L's deflate grows noise by up to a quarter (level 0)."""
    height, width = shape
    scanlines = int(height) * (int(width) + 1)
    ids = len(run_id) + len(image_id.encode()) + len((name or "").encode())
    return scanlines + scanlines // 4 + 128 + ids + MESSAGE_FIELDS_BYTES


def _unpack_item(item: Sequence[Any]) -> tuple[str, Any, str | None]:
    if len(item) == 2:
        return item[0], item[1], None
    if len(item) == 3:
        return item[0], item[1], item[2]
    raise InvalidMapError(
        f"submit_many items are (image_id, map) or (image_id, map, name); received {len(item)} values"
    )


def _to_result(pending: PendingMap, meta: dict[str, Any] | None) -> MapResult:
    if meta is None:
        return MapResult.from_failure(pending.image_id, pending.name, TimeoutError("result still pending"))
    if meta["status"] == states.SUCCESS:
        return MapResult.from_success(pending.image_id, pending.name, meta["result"])
    return MapResult.from_failure(pending.image_id, pending.name, meta["result"])
