"""Celery workers (inference and training queues) and the `fairdiff` command line."""
