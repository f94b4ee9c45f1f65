"""actmap worker: render, storage and the Celery task that composes them.

``celery -A worker.app worker`` (or ``actmap worker``) runs it. The names below are usable
without any queue: the colorize-and-encode functions, and the gallery page of results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.gallery import write_gallery
    from worker.render import colorize, render_png

__all__ = ["colorize", "render_png", "write_gallery"]

_MODULES = {"colorize": "worker.render", "render_png": "worker.render", "write_gallery": "worker.gallery"}


def __getattr__(name: str) -> Any:
    # Loaded on first use: `celery -A worker.app` imports this package before anything else.
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
