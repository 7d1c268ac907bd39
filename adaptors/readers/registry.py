"""Which reader a setting names, loaded: the one place reader names and folders become objects.

A reader setting is 'none', 'testbed-cnn', 'testbed-clip' (the embedded testbed's readers), or a folder:
- `reader.json` with `"kind": "clip-zero-shot"` (`clip`: the CLIP folder, absolute or relative to this
  one; `attributes` / `person`: the spec of `ClipZeroShotReader`; `face_detector`: 'haar' or 'none'),
- a probe written by `fit_probe` (`probe.json`: its CLIP folder and face detector are recorded there),
- a head in the testbed CNN's format (config.json + model.safetensors).
A face detector other than 'none' wraps the reader so attributes are read on the largest face's crop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptors.readers.base import AttributeReader
from common.settings import has_attribute_classifier

READER_FILE = "reader.json"


def testbed_clip_dir() -> Path:
    """The embedded testbed's CLIP folder (tests and benchmarks name it; product code goes by setting)."""
    return Path(shipped_clip_dir("testbed-clip") or "")


def shipped_clip_dir(setting: str) -> str | None:
    """The CLIP folder behind a shipped reader name (e.g. 'testbed-clip'), for readers that need the encoder."""
    from adaptors.profiles import named_reader

    factory = named_reader(setting)
    folder = getattr(factory, "clip_folder", None)
    return str(folder) if folder is not None else None


def _clip_path(folder: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else (folder / path).resolve()


def _with_faces(reader: AttributeReader, detector: str, pad: float, size: int) -> AttributeReader:
    if detector == "none":
        return reader
    from adaptors.readers.faces import FaceCropReader, load_face_detector

    return FaceCropReader(load_face_detector(detector), reader, pad=pad, size=size)


def load_reader_folder(folder: str | Path, device: torch.device | str = "cpu") -> AttributeReader:
    """The attribute reader saved in `folder`, by the files it holds (the error names what was looked for)."""
    from adaptors.readers.clip import PROBE_CONFIG, ClipEncoder, ClipProbeReader, ClipZeroShotReader

    folder = Path(folder)
    if (folder / READER_FILE).is_file():
        cfg = json.loads((folder / READER_FILE).read_text())
        if cfg.get("kind") != "clip-zero-shot":
            raise ValueError(f"reader {str(folder)!r}: unknown kind {cfg.get('kind')!r} in {READER_FILE} (clip-zero-shot)")
        clip = ClipEncoder(_clip_path(folder, cfg["clip"]), device)
        reader = ClipZeroShotReader(clip, cfg, name=cfg.get("name") or f"clip-zero-shot:{folder.name}")
        return _with_faces(reader, cfg.get("face_detector", "none"), float(cfg.get("crop_pad", 0.5)), clip.size)
    if (folder / PROBE_CONFIG).is_file():
        cfg = json.loads((folder / PROBE_CONFIG).read_text())
        clip = ClipEncoder(_clip_path(folder, cfg["clip"]), device)
        reader = ClipProbeReader(clip, folder, name=cfg.get("name") or f"clip-probe:{folder.name}")
        return _with_faces(reader, cfg.get("face_detector", "none"), float(cfg.get("crop_pad", 0.5)), clip.size)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        from adaptors.classifiers import TestbedAttributeClassifier

        return TestbedAttributeClassifier(folder, device=device)
    raise FileNotFoundError(
        f"reader folder {str(folder)!r}: none of {READER_FILE} (CLIP zero-shot), {PROBE_CONFIG} (CLIP probe), "
        "config.json + model.safetensors (a CNN head) is there"
    )


def load_reader(setting: str, device: torch.device | str = "cpu") -> AttributeReader | None:
    """The reader a setting names; None for 'none'."""
    if setting == "none":
        return None
    from adaptors.profiles import named_reader, shipped_reader_names

    factory = named_reader(setting)
    if factory is not None:
        return factory(device)
    if not Path(setting).is_dir():
        raise FileNotFoundError(
            f"reader {setting!r}: neither 'none', {' / '.join(shipped_reader_names())}, nor an existing folder"
        )
    return load_reader_folder(setting, device)


def load_classifier(setting: str, base_model: str, device: torch.device | str = "cpu") -> AttributeReader | None:
    """The steering reader (FAIRDIFF_CLASSIFIER) for a base model: 'auto' is its profile's steering reader; 'none'
    steers with nothing; anything else is a reader `load_reader` knows (a shipped name, or a reader folder of any kind:
    CLIP zero-shot, CLIP probe, a head in the CNN's format)."""
    if not has_attribute_classifier(setting, base_model):
        return None
    if setting == "auto":
        from adaptors.profiles import get_profile

        profile = get_profile(base_model)
        if profile is None or profile.steer_reader is None:
            return None
        return profile.readers[profile.steer_reader](device)
    return load_reader(setting, device)


def audit_record(auditor: AttributeReader, steerer: AttributeReader | None, steered: bool) -> dict:
    """What a result says about its audit: the reader that read it, and whether that reader also steered it."""
    return {"name": auditor.name, "steered": bool(steered and steerer is not None and auditor is steerer)}


def load_auditor(classifier_setting: str, audit_setting: str, base_model: str, steerer: AttributeReader | None,
                 device: torch.device | str = "cpu") -> AttributeReader | None:  # fmt: skip
    """The reader that audits for this base model: the steering reader itself where the profile has one reader."""
    from common.readers import reader_choice

    choice = reader_choice(classifier_setting, audit_setting, base_model)
    if choice.audit == "none":
        return None
    if choice.audit_is_steer and steerer is not None:
        return steerer
    return load_reader(choice.audit, device)
