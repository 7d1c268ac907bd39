# ruff: noqa: T201, B023, E501  (a research script: prints its rows; each hook runs inside its own loop iteration)
"""GMM latent balancing on the testbed: which step t*, feature space, K, covariance and move (research, issue 36).

Per held-out occupation: N calibration images (latents recorded after every step), components named by the
steering classifier's majority class of their finished images; then fresh seeds, each assigned a gender class
50/50, moved (or drawn) into a component of its class at step s, every image read by the oracle.

    python research/gmm/study.py [--occupations senator secretary] [--n 256] [--eval 48]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sklearn.decomposition import PCA  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from adaptors.audit import classify  # noqa: E402
from adaptors.classifiers import TestbedAttributeClassifier  # noqa: E402
from adaptors.generation import GenerationSpec, configure_threads, generate, load_pipeline  # noqa: E402
from testbed.oracle import read_batch  # noqa: E402
from testbed.world import prompt_for  # noqa: E402

ATTR = "gender"


def record(pipe, prompt, n, seed, steps):
    kept: dict[int, list[torch.Tensor]] = {}

    def hook(step, latents, rows):
        kept.setdefault(step, []).append(latents.detach().clone())

    images = generate(pipe, GenerationSpec(prompt, num_images=n, seed=seed, steps=steps), max_batch=64, on_latents=hook)
    return images, {s: torch.cat(v).reshape(n, -1).numpy() for s, v in kept.items()}


def pixel_variety(images: np.ndarray, groups: list[str]) -> float:
    flat = images.reshape(len(images), -1)
    d = []
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        d += [float(np.sqrt(((flat[i] - flat[j]) ** 2).mean())) for i, j in itertools.combinations(idx, 2)]
    return float(np.mean(d))


class _PerClass:
    """K components per class (fewer where the class has few images), as one mixture."""

    def __init__(self, z, labels, k, cov):
        means, covs, weights = [], [], []
        for cls in sorted({lab for lab in labels if lab is not None}):
            rows = z[[i for i, lab in enumerate(labels) if lab == cls]]
            kc = max(1, min(k, len(rows) // 10))
            g = GaussianMixture(kc, covariance_type=cov, random_state=0, reg_covar=1e-3).fit(rows)
            means += list(g.means_)
            covs += list(g.covariances_)
            weights += list(g.weights_ * len(rows) / len(z))
        self.means_, self.covariances_, self.weights_ = np.array(means), np.array(covs), np.array(weights)
        self.cov = cov

    def predict_proba(self, z):
        from scipy.stats import multivariate_normal

        logp = np.stack([
            multivariate_normal(m, c if self.cov == "full" else np.diag(c), allow_singular=True).logpdf(z) + np.log(w)
            for m, c, w in zip(self.means_, self.covariances_, self.weights_)
        ], axis=-1).reshape(len(z), -1)  # fmt: skip
        logp -= logp.max(1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(1, keepdims=True)

    def predict(self, z):
        return self.predict_proba(z).argmax(1)


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--occupations", nargs="+", default=["senator", "secretary"])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--at", nargs="+", type=int, default=[1, 3, 5, 8])
    ap.add_argument("--dims", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--ks", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--fits", nargs="+", default=["per_class", "joint"])
    ap.add_argument("--covs", nargs="+", default=["full", "diag"])
    ap.add_argument("--moves", nargs="+", default=["shift", "draw"])
    args = ap.parse_args()
    configure_threads(0)
    pipe = load_pipeline("testbed", device="cpu")
    clf = TestbedAttributeClassifier()
    rows = []
    for occ in args.occupations:
        prompt = prompt_for(occ)
        t0 = time.perf_counter()
        images, lat = record(pipe, prompt, args.n, 0, args.steps)
        calib_s = time.perf_counter() - t0
        labels = [a.label(ATTR) for a in classify(clf, images)]
        none_imgs, none_lat = record(pipe, prompt, args.eval, 777, args.steps)
        none_read = read_batch(none_imgs.numpy() * 2 - 1)
        assigned = ["female" if i % 2 == 0 else "male" for i in range(args.eval)]
        base_var = pixel_variety(none_imgs.numpy(), assigned)
        print(f"{occ}: calibration {args.n} images {calib_s:.1f}s; base female {labels.count('female') / args.n:.2f}; "
              f"none oracle female {np.mean([r.gender == 'female' for r in none_read]):.2f}", file=sys.stderr)  # fmt: skip
        grid = itertools.product(args.at, args.dims, args.ks, args.covs, args.moves, args.fits)
        for s, d, k, cov, move, fit in grid:
            x = lat[s]
            pca = PCA(n_components=d, random_state=0).fit(x)
            z = pca.transform(x)
            if fit == "joint":
                gmm = GaussianMixture(k, covariance_type=cov, random_state=0, reg_covar=1e-3, n_init=2).fit(z)
                comp = gmm.predict(z)
            else:  # one mixture per class the reader saw, its components named by construction
                gmm = _PerClass(z, labels, k, cov)
                comp = gmm.predict(z)
            names, purity = {}, []
            for c in range(len(gmm.weights_)):
                members = [labels[i] for i in range(len(labels)) if comp[i] == c and labels[i] is not None]
                if members:
                    top = max(set(members), key=members.count)
                    names[c] = top
                    purity.append(members.count(top) / len(members))
            if set(names.values()) != {"female", "male"}:
                rows.append({"occ": occ, "s": s, "d": d, "k": k, "cov": cov, "move": move, "fit": fit,
                             "skip": "a class has no component"})  # fmt: skip
                continue
            weights = gmm.weights_
            rng = np.random.default_rng(1)

            _full = np.stack([x[comp == c].mean(0) if (comp == c).any() else pca.inverse_transform(gmm.means_[c : c + 1])[0]
                              for c in range(len(gmm.weights_))])  # fmt: skip

            def hook(step, latents, idx, _s=s, _gmm=gmm, _pca=pca, _names=names, _w=weights, _move=move, _cov=cov):
                if step != _s:
                    return None
                flat = latents.reshape(len(latents), -1).numpy()
                zz = _pca.transform(flat)
                post = _gmm.predict_proba(zz)
                out = flat.copy()
                for r, i in enumerate(idx):
                    want = [c for c, nm in _names.items() if nm == assigned[i]]
                    # the most likely component of the assigned class for this latent
                    tgt = max(want, key=lambda c: post[r, c])
                    if _move == "shift":
                        own = post[r] @ _gmm.means_
                        delta = _gmm.means_[tgt] - own
                        out[r] = flat[r] + delta @ _pca.components_
                    elif _move == "shift_full":  # the same, with the components' means in the whole latent
                        out[r] = flat[r] + _full[tgt] - post[r] @ _full
                    else:
                        p = np.array([_w[c] for c in want])
                        c = want[rng.choice(len(want), p=p / p.sum())]
                        if _cov == "full":
                            zdraw = rng.multivariate_normal(_gmm.means_[c], _gmm.covariances_[c])
                        else:
                            zdraw = _gmm.means_[c] + rng.standard_normal(d) * np.sqrt(_gmm.covariances_[c])
                        resid = flat[r] - _pca.inverse_transform(zz[r : r + 1])[0]
                        out[r] = _pca.inverse_transform(zdraw[None])[0] + resid
                return torch.from_numpy(out).reshape(latents.shape).to(latents.dtype)

            moved = generate(pipe, GenerationSpec(prompt, num_images=args.eval, seed=777, steps=args.steps), max_batch=64,
                             on_latents=hook)  # fmt: skip
            read = read_batch(moved.numpy() * 2 - 1)
            hit = np.mean([r.person and r.gender == a for r, a in zip(read, assigned)])
            kept = np.mean([r.occupation == occ for r in read])
            var = pixel_variety(moved.numpy(), assigned) / base_var

            def dep(rs, u):
                out = 0.0
                f = [r for r in rs if r.person and r.gender == "female"]
                m = [r for r in rs if r.person and r.gender == "male"]
                if len(f) < 5 or len(m) < 5:
                    return None
                vals = sorted({getattr(r, u) for r in rs})
                for v in vals:
                    out = max(out, abs(np.mean([getattr(r, u) == v for r in f]) - np.mean([getattr(r, u) == v for r in m])))
                return round(out, 3)

            row = {"occ": occ, "s": s, "d": d, "k": k, "cov": cov, "move": move, "fit": fit, "purity": round(float(np.mean(purity)), 3),
                   "hit": round(float(hit), 3), "kept": round(float(kept), 3), "variety": round(var, 3),
                   "dep_skin": dep(read, "skin_tone"), "dep_age": dep(read, "age"),
                   "person": round(float(np.mean([r.person for r in read])), 3)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
