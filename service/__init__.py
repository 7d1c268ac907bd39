"""The FastAPI gateway: validates requests, writes jobs, enqueues tasks by name. Torch-free by design."""
