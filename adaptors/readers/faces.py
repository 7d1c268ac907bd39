"""Face detection from a wheel, and attribute reading on the largest face's padded crop.

Real deployments read attributes the way Shen et al. and the fairness literature do: detect faces,
keep the largest, make its box square and pad it, resize, then classify the crop. An image with no
face has no person, and is counted as such by the audit (as the testbed's person head does).

Detectors:
- `haar`: OpenCV's Haar cascades, shipped inside opencv-python-headless 4.x (`cv2.data.haarcascades`;
  the 5.x wheels no longer ship them). A frontal cascade, plus the profile cascade on the image and its
  mirror (profile faces are common in generated portraits); overlapping boxes are merged.
- `none`: the whole image is the face (the testbed, and images that are already face crops).

The crop is an affine resampling (`grid_sample`), so it is differentiable in the pixels: only the box
choice is discrete.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from adaptors.readers.base import AttributeReader, Detection, FaceDetector

logger = logging.getLogger(__name__)

# a logit that reads as "no person" (sigmoid ~ 1e-13) for images in which no face was found
NO_FACE_LOGIT = -30.0


class WholeImageDetector(FaceDetector):
    """`none`: every image is one face filling the frame."""

    name = "none"

    def detect(self, images: torch.Tensor) -> list[Detection]:
        h, w = images.shape[-2:]
        return [Detection(np.array([[0.0, 0.0, w, h]]), np.ones(1)) for _ in range(len(images))]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / smaller if smaller > 0 else 0.0


def merge_boxes(boxes: np.ndarray, scores: np.ndarray, overlap: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Greedy suppression by score: a box mostly inside a kept one (overlap of the smaller) is the same face."""
    order = np.argsort(-scores)
    keep: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) < overlap for j in keep):
            keep.append(int(i))
    return boxes[keep], scores[keep]


class HaarFaceDetector(FaceDetector):
    """OpenCV Haar cascades (frontal, and profile both ways), run on the grayscale image.

    A score is the share of the cascade's raw hits supporting a box, n / (n + min_neighbors), so a
    face found by many overlapping windows scores near 1 and a borderline one near 0.5.
    """

    name = "haar"

    def __init__(
        self,
        frontal: str = "haarcascade_frontalface_alt2.xml",
        profile: str | None = "haarcascade_profileface.xml",
        scale_factor: float = 1.05,
        min_neighbors: int = 4,
        min_size: float = 0.06,
        min_score: float = 0.75,
        max_side: int = 256,
    ) -> None:
        import cv2

        root = cv2.data.haarcascades
        self._cv2 = cv2
        self.cascades = [cv2.CascadeClassifier(root + frontal)]
        if profile:
            self.cascades.append(cv2.CascadeClassifier(root + profile))
        if any(c.empty() for c in self.cascades):
            raise FileNotFoundError(f"Haar cascade files missing under {root} (opencv-python-headless 4.x ships them)")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.min_score = min_score  # 0.75: at least 3 x min_neighbors raw hits; single-digit hits are texture
        # the cascades' cost grows with the pixel count: larger images are searched at this size (0: as they come;
        # 256 kept every answer of the comparison in research/face_detectors at 2.5x less time on 512 px photos)
        self.max_side = max_side

    def _run(self, cascade, gray: np.ndarray) -> tuple[list[list[float]], list[float]]:
        side = max(12, int(self.min_size * min(gray.shape)))
        rects, hits = cascade.detectMultiScale2(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side)
        )
        boxes = [[float(x), float(y), float(x + w), float(y + h)] for x, y, w, h in np.asarray(rects).reshape(-1, 4)]
        scores = [float(n) / (float(n) + self.min_neighbors) for n in np.asarray(hits).reshape(-1)]
        return boxes, scores

    def detect_gray(self, gray: np.ndarray) -> Detection:
        """Faces in one H x W uint8 grayscale image."""
        scale = 1.0
        if self.max_side and max(gray.shape) > self.max_side:
            scale = max(gray.shape) / self.max_side
            size = (round(gray.shape[1] / scale), round(gray.shape[0] / scale))
            gray = self._cv2.resize(gray, size, interpolation=self._cv2.INTER_AREA)
        found = self._detect_gray(gray)
        return Detection(found.boxes * scale, found.scores) if scale != 1.0 else found

    def _detect_gray(self, gray: np.ndarray) -> Detection:
        w = gray.shape[1]
        boxes, scores = self._run(self.cascades[0], gray)
        if len(self.cascades) > 1:
            b, s = self._run(self.cascades[1], gray)
            boxes, scores = boxes + b, scores + s
            b, s = self._run(self.cascades[1], np.ascontiguousarray(gray[:, ::-1]))
            boxes += [[w - x1, y0, w - x0, y1] for x0, y0, x1, y1 in b]
            scores += s
        strong = [i for i, s in enumerate(scores) if s >= self.min_score]
        if not strong:
            return Detection(np.zeros((0, 4)), np.zeros(0))
        kept, kept_scores = merge_boxes(np.asarray(boxes)[strong], np.asarray(scores)[strong])
        area = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
        order = np.argsort(-area)
        return Detection(kept[order], kept_scores[order])

    def detect(self, images: torch.Tensor) -> list[Detection]:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = []
        for px in pixels:
            rgb = np.ascontiguousarray(px.transpose(1, 2, 0))
            gray = self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2GRAY) if rgb.shape[2] == 3 else rgb[:, :, 0]
            out.append(self.detect_gray(gray))
        return out


def load_face_detector(name: str) -> FaceDetector:
    """`haar` or `none` (the whole image)."""
    if name == "none":
        return WholeImageDetector()
    if name == "haar":
        return HaarFaceDetector()
    raise ValueError(f"unknown face detector {name!r}: use 'haar' or 'none'")


def square_padded(box: np.ndarray, pad: float) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the box made square and grown by `pad` of its side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + pad)
    return (x0 + x1) / 2, (y0 + y1) / 2, side


def crop_faces(images: torch.Tensor, boxes: list[np.ndarray | None], size: int, pad: float = 0.5) -> torch.Tensor:
    """Each image's box (None: the whole image) made square, padded, resampled to size x size.

    Outside the image the crop is black (Shen et al. pad with -1 in [-1, 1]). Differentiable in `images`.
    """
    n, _, h, w = images.shape
    theta = torch.zeros(n, 2, 3, dtype=torch.float32)
    for i, box in enumerate(boxes):
        if box is None:
            theta[i, 0, 0] = theta[i, 1, 1] = 1.0
            continue
        cx, cy, side = square_padded(box, pad)
        theta[i, 0, 0], theta[i, 0, 2] = side / w, 2 * cx / w - 1
        theta[i, 1, 1], theta[i, 1, 2] = side / h, 2 * cy / h - 1
    grid = F.affine_grid(theta.to(images.device), [n, 3, size, size], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class FaceCropReader(AttributeReader):
    """An attribute reader applied to the largest face's padded crop; no face -> no person."""

    def __init__(self, detector: FaceDetector, reader: AttributeReader, pad: float = 0.5, size: int = 224) -> None:
        self.detector, self.reader, self.pad, self.size = detector, reader, pad, size
        self.attributes = reader.attributes
        self.differentiable = reader.differentiable
        self.name = f"{reader.name}+{detector.name}"

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.detector, WholeImageDetector):
            return self.reader.logits(images)
        found = [d.largest() for d in self.detector.detect(images)]
        out = dict(self.reader.logits(crop_faces(images, found, self.size, self.pad)))
        has_face = torch.tensor([b is not None for b in found], device=out["person"].device)
        out["person"] = torch.where(has_face, out["person"], torch.full_like(out["person"], NO_FACE_LOGIT))
        return out
