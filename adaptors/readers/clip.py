"""CLIP readers from a local folder in transformers' CLIP format (nothing is downloaded).

- `ClipZeroShotReader`: an attribute spec maps each class to prompts; a class's text embedding is the
  mean of its prompts' (normalised), and its logit is CLIP's scaled cosine with the image embedding.
- `ClipProbeReader`: a linear head per attribute on the normalised CLIP image embedding, saved as
  safetensors + JSON; `fit_probe` trains one from a labelled image folder (FairFace's CSV layout).
- `ClipSubjectReader`: prompt retrieval: which of a prompt set's prompts an image is closest to.

Images are resized and normalised in torch (bilinear, the folder's preprocessing statistics), so the
attribute readers are differentiable in the pixels: trainers and classifier guidance backpropagate.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adaptors.readers.base import AttributeReader, SubjectReader

logger = logging.getLogger(__name__)

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the person logit of readers that do not read presence themselves (the face detector does)
PRESENT_LOGIT = 10.0
PROBE_CONFIG, PROBE_WEIGHTS = "probe.json", "probe.safetensors"


class ClipEncoder:
    """A frozen local CLIPModel with its tokenizer; image embeddings are differentiable in the pixels."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP folder {str(folder)!r}: no config.json there (a local transformers CLIP folder)")
        self.folder = folder
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        size = self.model.config.vision_config.image_size
        mean, std, self.size = _CLIP_MEAN, _CLIP_STD, int(size)
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.embed_dim = int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100.0))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images resized to the model's input size and normalised, in torch (differentiable)."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > self.size
            )
        return (x - self.mean) / self.std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (N x D)."""
        dtype = next(self.model.parameters()).dtype
        out = self.model.get_image_features(pixel_values=self.pixels(images).to(dtype))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (T x D)."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")  # fmt: skip
        out = self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def class_embeds(self, prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
        """One embedding per class: the normalised mean of its prompts' embeddings (prompt ensembling)."""
        return torch.stack([F.normalize(self.text_embeds(p).mean(0), dim=-1) for p in prompts_per_class])


def _check_spec(spec: Mapping) -> None:
    attrs = spec.get("attributes")
    if not isinstance(attrs, Mapping) or not attrs:
        raise ValueError("attribute spec: 'attributes' must map each attribute to {class: [prompts]}")
    for attr, classes in attrs.items():
        if not isinstance(classes, Mapping) or len(classes) < 2:
            raise ValueError(f"attribute spec: {attr!r} needs at least two classes, each with prompts")
        for cls, prompts in classes.items():
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise ValueError(f"attribute spec: {attr}.{cls} needs a non-empty list of prompts")
    person = spec.get("person")
    if person is not None and set(person) != {"yes", "no"}:
        raise ValueError("attribute spec: 'person' maps 'yes' and 'no' to prompts")


class ClipZeroShotReader(AttributeReader):
    """Zero-shot CLIP: logits = logit_scale x cosine(image, class prompts).

    The spec (JSON) is {"attributes": {attr: {class: [prompt, ...]}}, "person": {"yes": [...], "no": [...]}};
    without "person" the reader reports every image as showing a person (a face detector decides that).
    """

    differentiable = True

    def __init__(self, clip: ClipEncoder, spec: Mapping, name: str | None = None) -> None:
        _check_spec(spec)
        self.clip = clip
        self.attributes = {a: list(c) for a, c in spec["attributes"].items()}
        self.text = {a: clip.class_embeds([spec["attributes"][a][c] for c in classes]) for a, classes in self.attributes.items()}
        self.person_text = clip.class_embeds([spec["person"]["yes"], spec["person"]["no"]]) if spec.get("person") else None
        self.name = name or f"clip-zero-shot:{clip.folder.name}"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings: what DFT's semantics-preservation term compares."""
        return self.clip.image_embeds(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.clip.image_embeds(images)
        scale = self.clip.logit_scale
        out = {a: scale * emb @ t.T for a, t in self.text.items()}
        if self.person_text is not None:
            both = scale * emb @ self.person_text.T
            out["person"] = both[:, 0] - both[:, 1]
        else:
            out["person"] = torch.full((len(images),), PRESENT_LOGIT, device=emb.device)
        return out


class ClipProbeReader(AttributeReader):
    """A linear head per attribute on normalised CLIP image embeddings (trained by `fit_probe`)."""

    differentiable = True

    def __init__(self, clip: ClipEncoder, folder: str | Path, name: str | None = None) -> None:
        folder = Path(folder)
        cfg = json.loads((folder / PROBE_CONFIG).read_text())
        if cfg.get("embed_dim") != clip.embed_dim:
            raise ValueError(
                f"probe {str(folder)!r} was fitted on {cfg.get('embed_dim')}-d embeddings; this CLIP gives {clip.embed_dim}"
            )
        self.clip = clip
        self.attributes = {a: list(c) for a, c in cfg["attributes"].items()}
        weights = load_file(str(folder / PROBE_WEIGHTS))
        self.heads = {a: (weights[f"{a}.weight"].to(clip.device), weights[f"{a}.bias"].to(clip.device)) for a in self.attributes}
        self.name = name or f"clip-probe:{folder.name}"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings: what DFT's semantics-preservation term compares."""
        return self.clip.image_embeds(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.clip.image_embeds(images)
        out = {a: emb @ w.T + b for a, (w, b) in self.heads.items()}
        out["person"] = torch.full((len(images),), PRESENT_LOGIT, device=emb.device)
        return out


def save_probe(folder: str | Path, heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]], attributes: Mapping[str, list[str]],
               embed_dim: int, extra: Mapping | None = None) -> None:  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for a, (w, b) in heads.items():
        tensors[f"{a}.weight"], tensors[f"{a}.bias"] = (
            w.detach().float().contiguous().cpu(),
            b.detach().float().contiguous().cpu(),
        )
    save_file(tensors, str(folder / PROBE_WEIGHTS))
    cfg = {"kind": "clip-linear-probe", "embed_dim": embed_dim, "attributes": {a: list(c) for a, c in attributes.items()}}
    (folder / PROBE_CONFIG).write_text(json.dumps({**cfg, **(extra or {})}, indent=2))


# FairFace's label CSVs carry these besides the attributes
NOT_ATTRIBUTES = {"file", "service_test"}


def read_label_csv(
    path: str | Path, attributes: Sequence[str] | None = None
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(files, labels per attribute, sorted classes per attribute) from a CSV with a `file` column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0]:
        raise ValueError(f"{str(path)!r}: a CSV with a header and a 'file' column is needed (FairFace's layout)")
    names = list(attributes) if attributes else [c for c in rows[0] if c not in NOT_ATTRIBUTES]
    missing = [a for a in names if a not in rows[0]]
    if missing:
        raise ValueError(f"{str(path)!r} has no column {missing[0]!r}")
    labels = {a: [r[a] for r in rows] for a in names}
    classes = {a: sorted(set(v)) for a, v in labels.items()}
    for a, c in classes.items():
        if len(c) < 2:
            raise ValueError(f"attribute {a!r} has one class only in {str(path)!r}")
    return [r["file"] for r in rows], labels, classes


def _load_images(files: Sequence[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = []
    size = None
    for f in files:
        img = Image.open(f).convert("RGB")
        size = size or img.size
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _train_head(
    x: torch.Tensor, y: torch.Tensor, k: int, steps: int, weight_decay: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full batch (embeddings are few and small)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(k, x.shape[1], generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w.T * 10.0 + b, y) + weight_decay * (w**2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (w * 10.0).detach(), b.detach()


def fit_probe(
    clip_path: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    attributes: Sequence[str] | None = None,
    held_out: float = 0.2,
    steps: int = 300,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch: int = 64,
    face_detector: str = "none",
    device: torch.device | str = "cpu",
) -> dict:
    """Train a linear probe on CLIP image embeddings; returns the report (also written beside the head).

    `labels_csv` has a `file` column (relative to `image_root`, default the CSV's folder) and one column
    per attribute (every other column unless `attributes` names them); FairFace's label files fit as they
    are. A seeded `held_out` share of the rows is kept out of training and its accuracy reported, with
    the majority-class accuracy beside it.
    """
    t0 = time.perf_counter()
    clip = ClipEncoder(clip_path, device)
    files, labels, classes = read_label_csv(labels_csv, attributes)
    root = Path(image_root) if image_root is not None else Path(labels_csv).parent
    from adaptors.readers.faces import crop_faces, load_face_detector

    detector = load_face_detector(face_detector)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(files), batch):
            images = _load_images([root / f for f in files[i : i + batch]])
            if face_detector != "none":
                images = crop_faces(images, [d.largest() for d in detector.detect(images)], size=clip.size)
            chunks.append(clip.image_embeds(images).cpu())
    emb = torch.cat(chunks)
    n = len(files)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(held_out * n))) if held_out > 0 else 0
    test, train = order[:n_test], order[n_test:]
    heads, report = {}, {}
    for a, names in classes.items():
        y = torch.tensor([names.index(v) for v in labels[a]])
        heads[a] = _train_head(emb[train], y[train], len(names), steps, weight_decay, seed)
        entry = {"classes": names, "train": len(train)}
        if n_test:
            pred = (emb[test] @ heads[a][0].T + heads[a][1]).argmax(-1)
            counts = np.bincount(y[train].numpy(), minlength=len(names))
            entry.update(held_out=int(n_test), accuracy=round(float((pred == y[test]).float().mean()), 4),
                         majority_accuracy=round(float((y[test] == int(counts.argmax())).float().mean()), 4))  # fmt: skip
        report[a] = entry
    result = {"clip": str(Path(clip_path).resolve()), "images": n, "attributes": report,
              "face_detector": face_detector, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    save_probe(out_dir, heads, classes, clip.embed_dim, {"clip": result["clip"], "face_detector": face_detector})
    (Path(out_dir) / "fit_report.json").write_text(json.dumps(result, indent=2))
    logger.info("probe fitted on %d images in %.1fs: %s", n, result["seconds"],
                {a: r.get("accuracy") for a, r in report.items()})  # fmt: skip
    return result


class ClipSubjectReader(SubjectReader):
    """Prompt retrieval: an image shows the subject of the prompt (among a prompt set's) it is closest to.

    An image keeps its subject when it is closer to its own prompt than to every other prompt of the set.
    `min_margin` > 0 leaves images whose best and second-best cosines are that close unread (None).
    """

    def __init__(self, clip: ClipEncoder, prompts: Sequence[str], min_margin: float = 0.0, name: str | None = None) -> None:
        if len(prompts) < 2:
            raise ValueError("prompt retrieval needs at least two prompts to choose among")
        self.clip = clip
        self.prompts = list(dict.fromkeys(prompts))
        self.text = clip.text_embeds(self.prompts)
        self.min_margin = min_margin
        self.name = name or f"clip prompt retrieval:{clip.folder.name}"

    def similarities(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.image_embeds(images) @ self.text.T

    def read(self, images: torch.Tensor) -> list[str | None]:
        sims = self.similarities(images)
        top = sims.topk(2, dim=-1)
        out: list[str | None] = []
        for vals, idx in zip(top.values, top.indices, strict=True):
            out.append(self.prompts[int(idx[0])] if float(vals[0] - vals[1]) >= self.min_margin else None)
        return out

    def subject_of(self, prompt: str) -> str | None:
        return prompt if prompt in self.prompts else None


def image_similarity_kept(clip: ClipEncoder, before: torch.Tensor, after: torch.Tensor, minimum: float) -> list[bool]:
    """Whether each image stays within a CLIP image cosine of `minimum` of the base image from the same noise."""
    with torch.no_grad():
        return [(float(c) >= minimum) for c in (clip.image_embeds(before) * clip.image_embeds(after)).sum(-1)]
