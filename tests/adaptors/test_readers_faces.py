"""Face detection on real photographs shipped inside the scikit-image wheel, and the padded crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptors import classifiers
from adaptors.readers import AttributeReader
from adaptors.readers.faces import (
    NO_FACE_LOGIT,
    FaceCropReader,
    HaarFaceDetector,
    WholeImageDetector,
    crop_faces,
    load_face_detector,
)

skimage_data = pytest.importorskip("skimage.data")


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).float() / 255.0
    return (x.permute(2, 0, 1) if x.ndim == 3 else x[None].repeat(3, 1, 1))[None]


# the face in each photograph, (x0, y0, x1, y1), read off the images by hand
FACES = {"astronaut": (180, 70, 270, 170), "camera": (160, 75, 255, 195)}


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_one_face_on_each_photograph_with_the_box_on_the_face(haar, name):
    det = haar.detect(_tensor(getattr(skimage_data, name)()))[0]
    assert len(det.boxes) == 1, det.boxes
    x0, y0, x1, y1 = det.boxes[0]
    fx0, fy0, fx1, fy1 = FACES[name]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert fx0 <= cx <= fx1 and fy0 <= cy <= fy1, (det.boxes, FACES[name])
    # the box is face-sized: between half and twice the face's side
    assert 0.5 <= (x1 - x0) / (fx1 - fx0) <= 2.0
    assert 0.5 < det.scores[0] <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_face_on_noise(haar, seed):
    noise = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    assert not haar.detect(noise)[0].found


def test_no_face_on_a_blank_image(haar):
    assert not haar.detect(torch.full((2, 3, 128, 128), 0.5))[0].found


def test_none_is_the_whole_image():
    det = load_face_detector("none").detect(torch.zeros(2, 3, 32, 48))
    assert [d.boxes.tolist() for d in det] == [[[0.0, 0.0, 48.0, 32.0]]] * 2
    with pytest.raises(ValueError, match="unknown face detector"):
        load_face_detector("mtcnn")


def test_crop_is_square_padded_and_differentiable():
    images = torch.zeros(1, 3, 64, 64)
    images[:, :, 16:32, 16:32] = 1.0  # a white 16 x 16 "face"
    images.requires_grad_(True)
    crop = crop_faces(images, [np.array([16.0, 16.0, 32.0, 32.0])], size=32, pad=1.0)
    assert crop.shape == (1, 3, 32, 32)
    # padded by its side: the face fills the middle half of the crop
    assert crop[0, 0, 16, 16] > 0.9 and crop[0, 0, 2, 2] < 0.1
    crop.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # the whole image, with no box
    whole = crop_faces(images.detach(), [None], size=64)
    assert torch.allclose(whole, images.detach(), atol=1e-5)


class _Constant(AttributeReader):
    attributes = {"gender": ["female", "male"]}
    name = "constant"

    def logits(self, images):
        n = len(images)
        self.seen = images.shape
        return {"gender": torch.zeros(n, 2), "person": torch.full((n,), 5.0)}


def test_face_crop_reader_says_no_person_where_no_face(haar):
    images = torch.cat([_tensor(skimage_data.astronaut()), torch.full((1, 3, 512, 512), 0.5)])
    reader = FaceCropReader(haar, _Constant(), size=40)
    out = reader.logits(images)
    assert reader.reader.seen == (2, 3, 40, 40)
    assert out["person"].tolist() == [5.0, NO_FACE_LOGIT]
    pred = reader.predict(images)
    assert pred.person[0] > 0.99 and pred.person[1] < 1e-6
    assert reader.name == "constant+haar"
    # with `none` the images go through untouched
    assert FaceCropReader(WholeImageDetector(), _Constant()).logits(images)["person"].tolist() == [5.0, 5.0]


def test_the_testbed_cnn_is_an_attribute_reader():
    reader = classifiers.TestbedAttributeClassifier()
    assert isinstance(reader, AttributeReader) and classifiers.AttributeClassifier is AttributeReader
    assert reader.differentiable and reader.name == "testbed-cnn"
    assert reader.describe()["attributes"]["skin_tone"] == ["I", "II", "III", "IV"]
