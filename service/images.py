"""Serving a job's images in the format a request chose, with what made each image in its metadata.

Workers write PNGs (workers/inference.py); the gateway re-encodes on the way out, so a format is a property of the
response, not of the files. Each image carries its provenance: the prompt, the request's seed and the image's index,
the classes it was assigned and the classes the audit read, as PNG text chunks (`prompt`, `fairdiff`) or, in JPEG
and WebP, as EXIF (ImageDescription: the same JSON as the `fairdiff` chunk; Software: fairdiff).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
EXIF_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
QUALITY = 90  # JPEG and lossy WebP


def image_metadata(job: dict[str, Any], index: int) -> dict[str, Any]:
    """What made image `index` of a generate job, from its record (the request and, once finished, the result)."""
    request = job.get("request") or {}
    result = job.get("result") if isinstance(job.get("result"), dict) else {}
    images = result.get("images") or []
    image = images[index] if index < len(images) and isinstance(images[index], dict) else {}
    if not image:  # still running: what the worker recorded when it wrote the image
        ready = [r for r in job.get("images_ready") or [] if isinstance(r, dict) and r.get("index") == index]
        image = ready[0] if ready else {}
    readings = image.get("attributes") or {}
    audited = {attr: reading.get("class") for attr, reading in readings.items() if isinstance(reading, dict)}
    return {
        "job": job.get("id"),
        "prompt": request.get("prompt"),
        "seed": request.get("seed"),
        "seed_index": index,
        "assigned": image.get("assigned"),
        "audited": audited or None,
    }


def encode(path: Path, fmt: str, metadata: dict[str, Any]) -> bytes:
    """The PNG at `path` as `fmt` (png, webp or jpeg), with `metadata` embedded."""
    name, _ = FORMATS[fmt]
    meta_json = json.dumps({k: v for k, v in metadata.items() if v is not None}, ensure_ascii=True, separators=(",", ":"))
    out = io.BytesIO()
    with Image.open(path) as img:
        img = img.convert("RGB")
        if fmt == "png":
            info = PngInfo()
            if metadata.get("prompt") is not None:
                info.add_itxt("prompt", str(metadata["prompt"]))
            info.add_text("fairdiff", meta_json)
            img.save(out, name, pnginfo=info)
        else:
            exif = Image.Exif()
            exif[EXIF_DESCRIPTION] = meta_json
            exif[EXIF_SOFTWARE] = "fairdiff"
            img.save(out, name, quality=QUALITY, exif=exif.tobytes())
    return out.getvalue()


def read_metadata(data: bytes) -> dict[str, Any]:
    """The `fairdiff` metadata of an encoded image (the inverse of `encode`, for clients and tests)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return json.loads(img.text["fairdiff"])
        return json.loads(img.getexif()[EXIF_DESCRIPTION])


def image_path(jobs_dir: Path, job_id: str, index: int) -> Path | None:
    """The worker's PNG of image `index`, if it is there and inside jobs_dir."""
    root = jobs_dir.resolve()
    path = (root / job_id / f"{int(index)}.png").resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


def output_format(job: dict[str, Any]) -> str:
    """The image format a generate job's request chose (png by default)."""
    extra = (job.get("request") or {}).get("extra") or {}
    return str(extra.get("output_format", "png"))


def formatted_url(url: Any, fmt: str) -> Any:
    """A worker's `.png` image URL with the extension of `fmt` (anything else is returned as it is)."""
    if fmt != "png" and isinstance(url, str) and url.endswith(".png"):
        return url[: -len("png")] + fmt
    return url


def ready_image_event(job: dict[str, Any], image: dict[str, Any]) -> dict[str, Any]:
    """The `image` event for an image the worker has written: which image, its seed, its assigned classes and its URL
    in the request's format. The audit's reading comes with the finished job (the audit reads all images at once)."""
    return {
        "id": job.get("id"),
        "index": image.get("index"),
        "seed": image.get("seed"),
        "seed_index": image.get("index"),
        "assigned": image.get("assigned"),
        "url": formatted_url(image.get("url"), output_format(job)),
    }


def present_images(job: dict[str, Any], jobs_dir: Path) -> None:
    """Apply the request's `output_format` and `response_format` to a generate job's view, in place: image URLs end
    in the chosen extension, and with `b64_json` a succeeded job's images are inline too."""
    extra = (job.get("request") or {}).get("extra") or {}
    fmt = output_format(job)
    inline = extra.get("response_format") == "b64_json"
    result = job.get("result")
    if (fmt == "png" and not inline) or not isinstance(result, dict) or not isinstance(result.get("images"), list):
        return
    images = []
    for k, image in enumerate(result["images"]):
        if not isinstance(image, dict):
            images.append(image)
            continue
        image = dict(image)
        image["url"] = formatted_url(image.get("url"), fmt)
        if inline and job.get("state") == "succeeded":
            path = image_path(jobs_dir, job["id"], k)
            image["b64_json"] = base64.b64encode(encode(path, fmt, image_metadata(job, k))).decode("ascii") if path else None
        images.append(image)
    job["result"] = {**result, "images": images}
