"""Torch-free code shared by the gateway and the workers: settings, schemas, bias metrics."""
