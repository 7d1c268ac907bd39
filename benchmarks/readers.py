"""How well each attribute reader reads what the independent oracle reads, and what the face detector finds.

Per reader (the testbed CNN, which steers, and the testbed's tiny CLIP, which audits): accuracy against
the oracle per attribute on fresh renderer images and on generated images of the held-out occupations
per strategy -- `none`, `assign` (class prompts, group-direction guidance and the CNN's classifier
guidance), `assign_enforce` (misses regenerated until the audit reader, the CLIP, is satisfied), `guidance`
(IDA: the per-occupation weights benchmarks/fairness_ida.py calibrated and recorded in its result, at the
steps they were calibrated for; skin tone uses its uniform-target calibration) -- where accuracy on guided
images is the audit/oracle agreement the audit's figures rest on; time per image. Each figure is also given
on the "world-like" images only (`world_like`: oracle palette fit at least that of 99% of VAE round-trips of
renders), because strong guidance sometimes smears a face into colours no render has; the oracle's pixel vote
still answers there, but no reader trained on the world can be held to it, and the share of such images is
the generator's failure, reported beside the reader's.
The face detector's time and result on the photographs inside the scikit-image wheel. The request-
fairness benchmark's headline numbers stay oracle-read; this one measures the readers themselves.
Writes benchmarks/results/readers.json.

    python benchmarks/readers.py [--requests 4] [--images 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adaptors.assign import class_texts_for_testbed, generate_assigned, generate_directed, joint_assignment  # noqa: E402
from adaptors.enforce import enforce  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from adaptors.ida import ida_directions  # noqa: E402
from adaptors.readers.registry import load_reader, testbed_clip_dir  # noqa: E402
from benchmarks.results_io import RESULTS, environment, publish, weights_fingerprint  # noqa: E402
from common.settings import Settings  # noqa: E402
from testbed.classifier import _vae_roundtrip  # noqa: E402
from testbed.data import render_balanced  # noqa: E402
from testbed.oracle import palette_fit, read_batch  # noqa: E402
from testbed.world import ATTRIBUTES, TEST_OCCUPATIONS, prompt_for  # noqa: E402

TARGETS = {
    "gender_50_50": {"gender": {"female": 0.5, "male": 0.5}},
    "skin_tone_40_30_20_10": {"skin_tone": {"I": 0.4, "II": 0.3, "III": 0.2, "IV": 0.1}},
}
STRATEGIES = ("none", "assign", "assign_enforce", "guidance")
GUIDED = ("assign", "assign_enforce", "guidance")
# the fairness_ida.json calibration whose weights guide each target's `guidance` images
IDA_CALIBRATION = {"gender_50_50": "gender_50_50", "skin_tone_40_30_20_10": "skin_tone_uniform"}


def ida_calibrations() -> tuple[dict[str, dict[str, dict]], int, str | None]:
    """Per readers target and occupation, the IDA weights fairness_ida.json recorded; their steps; its revision."""
    path = RESULTS / "fairness_ida.json"
    if not path.is_file():
        return {}, 0, None
    ida = json.loads(path.read_text())
    weights = {name: {occ: row["weights"] for occ, row in ida.get(f"{cal}_per_occupation", {}).items()}
               for name, cal in IDA_CALIBRATION.items()}  # fmt: skip
    revision = ida.get("code_revision") or ida.get("revision") or _committed_at(path)
    return weights, int(ida["calibration"]["steps"]), revision


def _committed_at(path: Path) -> str | None:
    """The commit that last wrote a result file (for results written before they recorded their revision)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--abbrev=12", "--", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"committed at {out}" if out else None


def world_like(images: torch.Tensor, cut: float) -> np.ndarray:
    """Which images look like the world (oracle palette fit at least `cut`); see `testbed.oracle.palette_fit`."""
    return np.asarray([palette_fit(im) >= cut for im in images.clamp(0, 1).permute(0, 2, 3, 1).numpy()])


def agreement(reader, images: torch.Tensor, readings, like: np.ndarray | None = None) -> dict:
    """Per attribute, the share of images with a person (by the oracle) whose class the reader reads as the oracle does;
    with `like` (a mask of world-like images), the same on those images only, under `world_like`."""
    t0 = time.perf_counter()
    pred = reader.predict(images)
    seconds = time.perf_counter() - t0
    out: dict = {"images": len(images), "oracle_person": int(sum(r.person for r in readings))}
    right = {}
    for a, classes in reader.attributes.items():
        right[a] = np.asarray(
            [r.person and classes[int(pred.probs[a][i].argmax())] == getattr(r, a) for i, r in enumerate(readings)]
        )
    person = np.asarray([r.person for r in readings])
    for a in reader.attributes:
        out[a] = round(float(right[a][person].mean()), 4) if person.any() else None
    out["person_agreement"] = round(float(np.mean([(float(p) >= 0.5) == r.person for p, r in zip(pred.person, readings)])), 4)
    out["ms_per_image"] = round(1000 * seconds / len(images), 3)
    if like is not None:
        keep = person & like
        share = round(float(keep.sum() / max(1, person.sum())), 4)
        accuracy = {a: round(float(right[a][keep].mean()), 4) if keep.any() else None for a in reader.attributes}
        out["world_like"] = {"share_of_people": share, **accuracy}
    return out


def per_occupation_agreement(reader, images, readings, occupations) -> dict:
    out = {}
    for occ in sorted(set(occupations)):
        idx = [i for i, o in enumerate(occupations) if o == occ]
        res = agreement(reader, images[idx], [readings[i] for i in idx])
        out[occ] = {a: res[a] for a in ATTRIBUTES}
    return out


def face_detectors() -> dict:
    from skimage import data

    from adaptors.readers.faces import HaarFaceDetector

    def tensor(px):
        x = torch.from_numpy(px).float() / 255
        return (x.permute(2, 0, 1) if x.ndim == 3 else x[None].repeat(3, 1, 1))[None]

    photos = {"astronaut": tensor(data.astronaut()), "camera": tensor(data.camera()),
              "noise": torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)),
              "blank": torch.full((1, 3, 512, 512), 0.5)}  # fmt: skip
    det = HaarFaceDetector()
    out = {}
    for name, img in photos.items():
        det.detect(img)  # warm-up
        t0 = time.perf_counter()
        found = det.detect(img)[0]
        out[name] = {"faces": len(found.boxes), "boxes": found.boxes.round(1).tolist(), "scores": found.scores.round(3).tolist(),
                     "ms": round(1000 * (time.perf_counter() - t0), 1)}  # fmt: skip
    return {"haar": out}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4, help="requests per occupation and target")
    parser.add_argument("--images", type=int, default=8, help="images per request")
    parser.add_argument("--renders", type=int, default=1000)
    parser.add_argument("--clip-accuracy", type=Path, metavar="FOLDER",
                        help="only print a CLIP reader folder's accuracy against the oracle (renders, VAE round-trips, "
                        "plain generated images), as testbed/clip.py records after training")  # fmt: skip
    args = parser.parse_args()
    if args.clip_accuracy is not None:
        print(json.dumps(clip_accuracy(args.clip_accuracy)))
        return
    settings = Settings()
    threads = configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    readers = {"testbed-cnn": load_reader("testbed-cnn"), "testbed-clip": load_reader("testbed-clip")}
    steer, auditor = readers["testbed-cnn"], readers["testbed-clip"]
    texts = class_texts_for_testbed()
    kw = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
          "classifier_scale": settings.assign_classifier_scale}  # fmt: skip

    x, _ = render_balanced(args.renders, 4242)
    renders = (torch.from_numpy(x) + 1) / 2
    render_readings = read_batch(x)
    # "world-like": at least the palette fit of 99% of VAE round-trips of renders (what the decoder's blur alone does)
    roundtrips = (_vae_roundtrip(pipe.vae, torch.from_numpy(x)) + 1) / 2
    cut = float(np.quantile([palette_fit(im) for im in roundtrips.permute(0, 2, 3, 1).numpy()], 0.01))

    images = {k: [] for k in STRATEGIES}
    occupations: list[str] = []
    guided_occupations: list[str] = []
    satisfied = []
    ida_weights, ida_steps, ida_revision = ida_calibrations()
    for occ in TEST_OCCUPATIONS:
        for name, target in TARGETS.items():
            for r in range(args.requests):
                seed = 20_000 + r
                spec = GenerationSpec(prompt_for(occ), num_images=args.images, seed=seed,
                                      steps=settings.default_steps, guidance_scale=settings.default_guidance_scale)  # fmt: skip
                assignment = joint_assignment(args.images, target, seed)
                images["none"].append(generate(pipe, spec))
                assigned = generate_assigned(pipe, spec, assignment, texts, classifier=steer, **kw)
                images["assign"].append(assigned)
                enforced, _, report = enforce(pipe, auditor, spec, assignment, texts, assigned,
                                              max_rounds=settings.enforce_max_rounds, steer=steer, **kw)  # fmt: skip
                images["assign_enforce"].append(enforced)
                satisfied.append(report.satisfied)
                occupations += [occ] * args.images
                weights = ida_weights.get(name, {}).get(occ)
                if weights:
                    rows = ida_directions(prompt_for(occ), weights, texts)
                    images["guidance"].append(generate_directed(pipe, replace(spec, steps=ida_steps), [rows] * args.images))
                    guided_occupations += [occ] * args.images
        print(f"generated {occ}", file=sys.stderr)
    stacked = {k: torch.cat(v) for k, v in images.items() if v}
    readings = {k: read_batch(v.numpy() * 2 - 1) for k, v in stacked.items()}

    result: dict = {"benchmark": "readers", "requests_per_cell": args.requests, "images_per_request": args.images,
                    "occupations": list(TEST_OCCUPATIONS), "targets": TARGETS, "auditor": "testbed-clip",
                    "steering_reader": "testbed-cnn", "readers": {},
                    "guidance_weights": {"from": "fairness_ida.json", "calibrations": IDA_CALIBRATION,
                                         "steps": ida_steps, "code_revision": ida_revision}}  # fmt: skip
    for name, reader in readers.items():
        entry = {"renders": agreement(reader, renders, render_readings)}
        for k in stacked:
            entry[k] = agreement(reader, stacked[k], readings[k], world_like(stacked[k], cut))
        entry["guided_per_occupation"] = per_occupation_agreement(reader, stacked["assign"], readings["assign"], occupations)
        if "guidance" in stacked:
            entry["guidance_per_occupation"] = per_occupation_agreement(reader, stacked["guidance"], readings["guidance"],
                                                                        guided_occupations)  # fmt: skip
        result["readers"][name] = entry
    guided = [k for k in GUIDED if k in stacked]
    worst = {a: min(result["readers"]["testbed-clip"][k][a] for k in guided) for a in ATTRIBUTES}
    result["auditor_guided_agreement_min"] = worst
    result["auditor_meets_0_97"] = all(v is not None and v >= 0.97 for v in worst.values())
    clip = result["readers"]["testbed-clip"]
    result["world_like"] = {
        "palette_fit_cut": round(cut, 4),
        "rule": "oracle palette fit >= the 1st percentile of VAE round-trips of renders (testbed.oracle.palette_fit)",
        "auditor_guided_agreement_min": {a: min(clip[k]["world_like"][a] for k in guided) for a in ATTRIBUTES},
        "guided_share_of_people_min": min(clip[k]["world_like"]["share_of_people"] for k in guided),
    }
    result["enforce_satisfied_per_auditor"] = round(float(np.mean(satisfied)), 4)
    # how often `enforce` believes it is exact while the oracle disagrees with the assignment is the
    # request-fairness benchmark's business; here: the auditor's reading of enforced images vs the oracle
    result["face_detectors"] = face_detectors()
    result["weights"] = {"testbed-clip": weights_fingerprint(testbed_clip_dir())}
    result.update(environment(threads))
    publish("readers", result)


def oracle_accuracy(reader, images: torch.Tensor) -> dict:
    """Per attribute, the share of images the oracle reads a person in where the reader agrees with it."""
    from testbed.oracle import read_batch

    readings = read_batch(images.numpy() * 2 - 1)
    pred = reader.predict(images)
    out = {"images": len(images), "oracle_person": sum(r.person for r in readings)}
    out["person_agreement"] = round(float(np.mean([(p >= 0.5) == r.person for p, r in zip(pred.person.tolist(), readings)])), 4)
    for a, classes in reader.attributes.items():
        pairs = [(classes[int(pred.probs[a][i].argmax())], getattr(r, a)) for i, r in enumerate(readings) if r.person]
        out[a] = round(float(np.mean([p == o for p, o in pairs])), 4) if pairs else None
    return out


def clip_accuracy(folder: Path, seed: int = 12345) -> dict:
    """Accuracy against the oracle on fresh renders, their VAE round-trips and plain generated images."""
    from adaptors.generation import GenerationSpec, generate, load_pipeline
    from adaptors.readers.registry import load_reader_folder
    from testbed.data import render_balanced
    from testbed.world import OCCUPATIONS, PROMPT_TEMPLATE

    reader = load_reader_folder(folder)
    x, _ = render_balanced(1000, seed)
    renders = (torch.from_numpy(x) + 1) / 2
    pipe = load_pipeline("testbed", "cpu")
    roundtrip = (_vae_roundtrip(pipe.vae, torch.from_numpy(x)) + 1) / 2
    prompts = [PROMPT_TEMPLATE.format(occupation=o.name) for o in OCCUPATIONS]
    spec = GenerationSpec(prompt=prompts[0], prompts=prompts * 8, num_images=len(prompts) * 8, seed=seed)
    generated = generate(pipe, spec, max_batch=64)
    return {"renders": oracle_accuracy(reader, renders), "vae_roundtrip": oracle_accuracy(reader, roundtrip.clamp(0, 1)),
            "generated_plain": oracle_accuracy(reader, generated)}  # fmt: skip


if __name__ == "__main__":
    main()
