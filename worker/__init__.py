"""Celery workers: task wrappers, the conversion pipeline and the enclave runtime sources."""
