"""actmap worker: render, storage and the Celery task that composes them."""
