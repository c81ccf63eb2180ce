"""Celery: the app, enqueueing, lanes, the worker's tasks, warm-up and memory."""
