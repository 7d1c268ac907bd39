"""Haar cascades (the product's detector) against MediaPipe's BlazeFace, on the photographs the wheels carry.

Issue #35 asks for the face detector to be chosen by measurement. MediaPipe <= 0.10.21 ships its
models in the wheel; it is not a product dependency, so this study runs with it on PYTHONPATH:

    pip install --target /tmp/mpt --no-deps mediapipe==0.10.21 absl-py flatbuffers attrs 'protobuf>=4.25,<5'
    pip install --target /tmp/mpt matplotlib
    PYTHONPATH=/tmp/mpt:. .venv/bin/python research/face_detectors/compare.py

Images: scikit-image's astronaut and camera (one face each), noise and blank (none), and its LFW
subset (100 face crops and 100 non-face crops, 25 px, each upscaled to 96 px and pasted at a random
place on a 256 px grey canvas, so a detector must find a face, not be handed one).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from skimage import data
from skimage.transform import resize

torch.set_num_threads(1)
os.environ.setdefault("GLOG_minloglevel", "2")


def _canvas(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    face = (resize(crop, (96, 96)) * 255).astype(np.uint8)
    out = np.full((256, 256), 128, np.uint8)
    y, x = rng.integers(0, 256 - 96, size=2)
    out[y : y + 96, x : x + 96] = face
    return np.stack([out] * 3, -1)


def images() -> dict[str, tuple[list[np.ndarray], int]]:
    """name -> (RGB uint8 images, faces in each)."""
    rng = np.random.default_rng(0)
    lfw = data.lfw_subset()  # 200 x 25 x 25: the first 100 are faces, the rest are not
    noise = (np.random.default_rng(1).random((512, 512, 3)) * 255).astype(np.uint8)
    return {
        "astronaut": ([data.astronaut()], 1),
        "camera": ([np.stack([data.camera()] * 3, -1)], 1),
        "noise": ([noise], 0),
        "blank": ([np.full((512, 512, 3), 128, np.uint8)], 0),
        "lfw_faces": ([_canvas(c, rng) for c in lfw[:100]], 1),
        "lfw_non_faces": ([_canvas(c, rng) for c in lfw[100:]], 0),
    }


def haar(**kw):
    from adaptors.readers.faces import HaarFaceDetector

    det = HaarFaceDetector(**kw)

    def run(img: np.ndarray) -> int:
        x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 255
        return len(det.detect(x)[0].boxes)

    return run


def mediapipe(model_selection: int):
    from mediapipe.python.solutions import face_detection

    det = face_detection.FaceDetection(model_selection=model_selection, min_detection_confidence=0.5)

    def run(img: np.ndarray) -> int:
        found = det.process(np.ascontiguousarray(img)).detections
        return len(found) if found else 0

    return run


def measure(run, sets) -> dict:
    out = {}
    for name, (imgs, faces) in sets.items():
        run(imgs[0])  # warm-up
        t0 = time.perf_counter()
        counts = [run(img) for img in imgs]
        ms = 1000 * (time.perf_counter() - t0) / len(imgs)
        hit = sum((c >= 1) if faces else (c == 0) for c in counts) / len(imgs)
        out[name] = {"images": len(imgs), "right": round(hit, 3), "ms_per_image": round(ms, 1)}
    return out


def main() -> None:
    sets = images()
    result = {"haar_full_size": measure(haar(max_side=0), sets)}
    for side in (384, 256):
        result[f"haar_max_side_{side}"] = measure(haar(max_side=side), sets)
    result["haar_max_side_256_scale_1.1"] = measure(haar(max_side=256, scale_factor=1.1), sets)
    try:
        result["mediapipe_short_range"] = measure(mediapipe(0), sets)
        result["mediapipe_full_range"] = measure(mediapipe(1), sets)
    except ImportError as exc:
        result["mediapipe"] = f"not importable: {exc}"
    result["right_means"] = "share of images where a face was found (face sets) or none was (face-free sets)"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
