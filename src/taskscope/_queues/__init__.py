"""Engine hooks for task queues (Celery, taskiq): the same records, spans and sinks."""
