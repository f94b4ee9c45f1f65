"""The Celery app of the workers: ``celery -A worker.app worker`` (or ``actmap worker``)."""

from __future__ import annotations

from producer.celery_config import make_celery
from producer.settings import Settings
from worker import kombu_patches

kombu_patches.install()

settings = Settings()
app = make_celery(settings, "actmap")
app.conf.include = ["worker.tasks"]
