"""Readers: what fairdiff reads images with (faces, attributes, subjects), behind three interfaces.

`base` defines them; `faces` detects and crops faces; `clip` reads attributes and subjects with a local
CLIP folder; `registry` loads the reader a setting names, so the audit and the trainers never know which.
"""

from adaptors.readers.base import AttributeReader, Detection, FaceDetector, Prediction, SubjectReader

__all__ = ["AttributeReader", "Detection", "FaceDetector", "Prediction", "SubjectReader"]
