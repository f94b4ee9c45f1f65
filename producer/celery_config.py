"""The Celery configuration producer and worker share, built from Settings."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery

from producer.settings import Settings

TASK_NAME = "actmap.render_maps"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.effective_result_backend,
        # msgpack only, for tasks and results: never pickle, and no JSON either, so a
        # message that is not ours is refused before any code sees it.
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "accept_content": ["msgpack"],
        "result_accept_content": ["msgpack"],
        "event_serializer": "json",
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        "result_expires": settings.result_expires_s,
        # A map is acknowledged only once its PNG is stored and its result recorded, and a
        # worker that dies mid-map gives the message back: rendering is idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": _transport_options(settings),
        "worker_hijack_root_logger": False,
    }
    # rediss:// without ssl_cert_reqs in the URL: verify the server's certificate (against the system
    # trust store unless ssl_ca_certs names a CA). Left alone, kombu's broker would connect without
    # verifying anything, and Celery's Redis result backend would refuse the URL outright.
    if _verifies_by_default(settings.effective_broker_url):
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if _verifies_by_default(settings.effective_result_backend):
        config["redis_backend_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if _uses_amqp_broker(settings):
        config.update(_amqp_config())
    if settings.uses_filesystem_broker():
        # The filesystem transport has no fan-out exchange: no remote control, no events.
        config["worker_enable_remote_control"] = False
    else:
        config["worker_send_task_events"] = True
        config["broker_connection_timeout"] = settings.publish_timeout_s
    return config


def make_celery(settings: Settings, main: str) -> Celery:
    folders = ["broker", "broker-processed", "broker-control"] if settings.uses_filesystem_broker() else []
    if settings.result_backend is None:
        folders.append("results")
    for folder in folders:
        (settings.resolved_home / folder).mkdir(parents=True, exist_ok=True)
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def _verifies_by_default(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(parts.query)


def _uses_amqp_broker(settings: Settings) -> bool:
    return settings.effective_broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _amqp_config() -> dict[str, Any]:
    """RabbitMQ: a replicated, durable quorum queue, and publishes the broker has confirmed.

    A quorum queue gives a dead consumer's messages back at once; it has no global QoS, so Celery
    sets the prefetch per consumer. Countdown retries go through Celery's native delayed delivery,
    which needs a topic exchange (docs/operating.md: an existing classic queue must be deleted).
    """
    return {
        "task_default_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
        # py-amqp waits for the broker's confirm of each publish: a publish that returned is on disk.
        "broker_transport_options": {"confirm_publish": True},
    }


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.uses_filesystem_broker():
        folder = str(settings.broker_folder)
        return {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": str(settings.resolved_home / "broker-processed"),
            "control_folder": str(settings.resolved_home / "broker-control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    return {
        # A worker killed outright leaves its maps unacknowledged: they come back after the
        # visibility timeout, found by a sweep every restore interval (kombu's default: an hour).
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # Each sweep holds a lock in Redis; a worker killed inside its sweep would hold back every
        # worker's sweeps until the lock expires (kombu's default: five minutes). Two intervals
        # are safe: a slower sweep only overlaps the next, and kombu restores each message once,
        # in a transaction that watches the unacknowledged set.
        "unacked_mutex_expire": 2 * settings.restore_interval_s,
        "health_check_interval": 10,
        "socket_connect_timeout": min(settings.publish_timeout_s, 5.0),
        "socket_timeout": max(settings.publish_timeout_s, 30.0),
    }
