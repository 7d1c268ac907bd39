"""What a finetune trains, behind one interface: LoRA (text encoder, UNet or both) or prefix tokens.

The trainer only needs the parameters, a way to encode prompts with them, a way to run the
frozen base model (the semantics reference and the "before" numbers), and a way to turn the
final (EMA) weights into an adaptor and leave the shared pipeline as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from adaptors.base import Adaptor
from adaptors.generation import PromptEncoder
from adaptors.lora import LoraAdaptor, lora_state_dict, remove_adapter
from adaptors.prefix import PREFIX_KEY, PrefixAdaptor, init_prefix, make_prompt_encoder
from common.adaptor_manifest import AdaptorManifest

TRAIN_ADAPTER = "fairdiff-training"
_EXPORT_ADAPTER = "fairdiff-export"  # where the token map is written out as a PEFT LoRA, briefly
TEXT_ENCODER_MODULES: dict[str, list[str] | str] = {
    "attention_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    # only the last block / only its two projections that write into the residual stream (PEFT regexes):
    # too little room to learn a change per training prompt, so a low-rank edit there must find one rule
    # that held-out prompts share ({last} is the index of the encoder's last layer, filled in per model).
    # Never the MLP alone: diffusers' load_lora_weights cannot read a text-encoder file without attention keys.
    "last_layer": r".*layers\.{last}\..*(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    "last_outputs": r".*layers\.{last}\.(self_attn\.out_proj|mlp\.fc2)",
    # one rank-r linear map applied to every token embedding (TokenMapTrainable): the same edit for every
    # word, so what it learns on the training words is a rule that reaches words it never saw
    "token_map": "token_embedding",
}
# "cross_attention_kv": only the projections that read the text (a PEFT regex, matched in full); a low-rank
# edit there can remove a direction of the text embedding for every prompt at once, as closed-form concept
# editing does, instead of learning a change per training prompt
UNET_MODULES: dict[str, list[str] | str] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "cross_attention_kv": r".*attn2\.(to_k|to_v)",
    # where the text's contribution enters the UNet's own features: there an attribute is drawn by one pathway
    # that every occupation shares, so an edit can be one rule for words whose embeddings share no axis
    "cross_attention_out": r".*attn2\.(to_v|to_out\.0)",
}


class Trainable:
    params: list[torch.nn.Parameter]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Hidden states of the positive prompts with the trained weights (differentiable)."""
        raise NotImplementedError

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        """The unconditional branch, encoded as inference will encode it."""
        raise NotImplementedError

    def prompt_encoder(self) -> PromptEncoder | None:
        """What `generate` needs to sample with the trained weights (None: the pipeline already has them)."""
        return None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The base model, for as long as the block runs."""
        yield

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        raise NotImplementedError

    def remove(self) -> None:
        """Leave the pipeline as it was before training."""


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]


class LoraTrainable(Trainable):
    """PEFT LoRA on the chosen components; Shen et al.'s init (A ~ N(0, 1/r), B = 0) and scale 1."""

    def __init__(
        self, pipe, where: str, rank: int, seed: int, text_modules: str = "attention_mlp", unet_modules: str = "attention"
    ) -> None:
        self.pipe = pipe
        self.components = {"text_encoder": ["text_encoder"], "unet": ["unet"], "both": ["text_encoder", "unet"]}[where]
        with torch.random.fork_rng(devices=[]):  # a seeded init, so a job is reproducible
            torch.manual_seed(seed)
            for component in self.components:
                modules = TEXT_ENCODER_MODULES[text_modules] if component == "text_encoder" else UNET_MODULES[unet_modules]
                if isinstance(modules, str) and component == "text_encoder":
                    modules = modules.replace("{last}", str(pipe.text_encoder.config.num_hidden_layers - 1))
                config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules)
                getattr(pipe, component).add_adapter(config, adapter_name=TRAIN_ADAPTER)
        self.params = [p for c in self.components for n, p in getattr(pipe, c).named_parameters() if TRAIN_ADAPTER in n]
        for p in self.params:
            p.requires_grad_(True)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)

    def _layers(self) -> list[BaseTunerLayer]:
        return [m for c in self.components for m in getattr(self.pipe, c).modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        layers = self._layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p in self.params:
                p.requires_grad_(True)

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        manifest.kind = LoraAdaptor.kind
        return LoraAdaptor(manifest, lora_state_dict(self.pipe, TRAIN_ADAPTER))

    def remove(self) -> None:
        remove_adapter(self.pipe, TRAIN_ADAPTER)


class PrefixTrainable(Trainable):
    """K soft tokens after BOS of the positive prompt; the negative prompt stays the plain "" encoding."""

    def __init__(self, pipe, num_tokens: int, seed: int, init_scale: float) -> None:
        self.pipe = pipe
        prefix = init_prefix(pipe, num_tokens, seed, init_scale).to(pipe.device)
        self.params = [torch.nn.Parameter(prefix)]
        self._encoder = make_prompt_encoder(pipe, self.params[0])

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self._encoder(list(prompts))

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return _encode(self.pipe, prompts)

    def prompt_encoder(self) -> PromptEncoder:
        return self._encoder

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        saved, self._encoder = self._encoder, (lambda prompts: _encode(self.pipe, list(prompts)))
        try:
            yield
        finally:
            self._encoder = saved

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        manifest.kind = PrefixAdaptor.kind
        return PrefixAdaptor(manifest, {PREFIX_KEY: self.params[0].detach().float().cpu().clone()})


class TokenMapTrainable(Trainable):
    """A rank-r linear map on the token embeddings, e -> e + B (M e), the same for every token.

    A LoRA on the embedding table gives each word a free correction; a held-out word gets none, and a
    finetune on a few dozen words learns a fix per word. Tying the table's LoRA to the embeddings
    (A = M E^T) leaves one map that must move all training words at once, which is the form of a
    rule like "take the gender coordinate out of every word" (cf. projecting biased directions out of
    text embeddings, Chuang et al. 2023). It is published as an ordinary text-encoder LoRA on the
    token embedding, so `load_lora_weights` reads it and workers switch it like any LoRA.

    M reads only the span of the token embeddings the training prompts use (M = M' P^T, P an
    orthonormal basis of that span). Unconstrained, Adam's per-element steps put weight on directions
    no training token has, where the map is never checked, and a held-out word with a component there
    gets an arbitrary change (on the neutral-looks testbed the 48 training words span 24 of the 64
    dimensions, and each held-out word brings its own look from outside them). M' starts at zero (as
    PEFT starts an embedding LoRA).

    `form="symmetric"` ties the two: e -> e - U U^T e with U = P U', so the map can only shrink a token's
    components along the directions it learns, on either side of zero. The free map reads one direction and
    writes another; on the neutral-looks testbed it often learnt to push the female-leaning words only and
    left the male-leaning held-out words where they were (fairness_dft.json, `text_gender_move` of the
    `_token_map_span_*` runs). Taking a direction out moves every word towards the middle in proportion to
    how far it leans, which is the form of the exact rule.
    `form="centred"` moves those components to learnt values c instead of zero, e -> e - U (U^T e - c),
    for targets away from the middle (age 75% young: the rule puts every word's age coordinate at 0.25).

    `leanings` (prompts x classes, the base model's measured shares minus the target's) start the map at
    the rule it suggests instead of at random: the directions of the span along which the training words'
    embeddings vary with how far their images lean (`measured_directions`), each taken out whole. Then the
    seed only breaks ties. The centre of `centred` still starts at zero: started at the training words' mean
    coordinate it moved the template's tokens and the padding as far, and the held-out images lost their
    occupation (`neutral_looks_gender_age_75_25_wide_token_map_centred_measured_r2_region_all_exact`: 11%).
    """

    def __init__(
        self,
        pipe,
        rank: int,
        seed: int,
        prompts: list[str],
        read: str = "span",
        form: str = "free",
        leanings: np.ndarray | None = None,
        init: str = "measured",
        regression_scale: float = 1.0,
        keep: str = "none",
        train: str = "both",
    ) -> None:
        self.pipe = pipe
        embedding = pipe.text_encoder.get_input_embeddings()
        self.kept_ids = kept_token_ids(pipe, prompts, keep).to(embedding.weight.device)
        dim = embedding.weight.shape[1]
        self.basis = prompt_span(pipe, prompts, read == "varying", read == "positive")  # P: dim x k
        self.form = form
        g = torch.Generator().manual_seed(seed)
        self.centre: torch.nn.Parameter | None = None
        if form in ("symmetric", "centred"):
            # U' (k x rank), small enough that the first images are the base model's, large enough that the
            # gradient, which is linear in U, is not zero at the start
            start = torch.randn(self.basis.shape[1], rank, generator=g) * SYMMETRIC_INIT_NORM / self.basis.shape[1] ** 0.5
            self.directions = torch.nn.Parameter(start.to(pipe.device))
            self.params = [self.directions]
            if form == "centred":
                self.centre = torch.nn.Parameter(torch.zeros(rank, device=pipe.device))
                self.params.append(self.centre)
        else:
            self.read = torch.nn.Parameter(torch.zeros(rank, self.basis.shape[1], device=pipe.device))  # M'
            self.write = torch.nn.Parameter((torch.randn(dim, rank, generator=g) / rank**0.5).to(pipe.device))  # B
            self.params = [self.read, self.write]
        if leanings is not None and init == "regression":
            self._start_at_regressed_rule(prompts, leanings, rank, regression_scale)
        elif leanings is not None:
            self._start_at_measured_rule(prompts, leanings, rank)
        self.gain: torch.nn.Parameter | None = None
        if train == "write":  # the start's read is kept; training only moves where and how far the map writes
            self.read.requires_grad_(False)
            self.params = [self.write]
        elif train == "scale":  # the start's map, each direction's move multiplied by a learnt factor
            self.read.requires_grad_(False)
            self.write.requires_grad_(False)
            self.gain = torch.nn.Parameter(torch.ones(rank, device=pipe.device))
            self.params = [self.gain]
        self._enabled = True
        self._hook = embedding.register_forward_hook(self._apply)

    def _start_at_measured_rule(self, prompts: list[str], leanings: np.ndarray, rank: int) -> None:
        words = varying_word_embeddings(self.pipe, prompts) @ self.basis.double().cpu().numpy()  # prompts x k
        directions, found = measured_directions(words, leanings)
        found = min(found, rank)
        u = torch.as_tensor(directions[:, :found], dtype=self.basis.dtype, device=self.basis.device)  # k x found
        with torch.no_grad():
            if self.form == "free":
                self.read[:found] = u.T
                self.write[:, :found] = -(self.basis @ u)
            else:  # the centre stays at zero: it moves every token, the template's and the padding too
                self.directions[:, :found] = u

    def _start_at_regressed_rule(self, prompts: list[str], leanings: np.ndarray, rank: int, scale: float) -> None:
        if self.form != "free":
            raise ValueError("hyperparameters.token_map_init: regression reads and writes different directions; "
                             "it needs token_map_form free")  # fmt: skip
        words = varying_word_embeddings(self.pipe, prompts) @ self.basis.double().cpu().numpy()  # prompts x k
        read, write = regressed_map(words, leanings, rank)
        write = -scale * write
        # the same map with both factors of equal length per direction. As fitted, the read is ~600 times the
        # write (the leans are log-odds of order 1, the words' rows of order 0.1), and Adam moves every entry
        # by about the rate whatever its size: at lr 3e-3 each step changed the write by ~60% of its entries
        # and the read by ~0.1%, so training scrambled the start's write instead of refining the map
        balance = np.sqrt(np.linalg.norm(write, axis=0) / np.maximum(np.linalg.norm(read, axis=0), 1e-300))
        read, write = read * balance, write / np.maximum(balance, 1e-300)
        with torch.no_grad():
            self.read.zero_()
            self.write.zero_()
            self.read[: read.shape[1]] = torch.as_tensor(read.T, dtype=self.read.dtype)
            self.write[:, : write.shape[1]] = self.basis @ torch.as_tensor(write, dtype=self.basis.dtype)

    def read_matrix(self) -> torch.Tensor:
        """M = M' P^T (rank x dim): what the map reads from a token embedding (U^T for the symmetric form)."""
        if self.form != "free":
            return (self.basis @ self.directions).T
        return self.read @ self.basis.T

    def write_matrix(self) -> torch.Tensor:
        """B (dim x rank): where the map writes what it read (-U for the symmetric form)."""
        if self.form != "free":
            return -(self.basis @ self.directions)
        return self.write if self.gain is None else self.write * self.gain

    def _apply(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if not self._enabled:
            return None
        read = output @ self.read_matrix().to(output.dtype).T
        if self.centre is not None:
            read = read - self.centre.to(output.dtype)
        if self.kept_ids.numel():
            read = read * ~torch.isin(args[0], self.kept_ids)[..., None]
        return output + read @ self.write_matrix().to(output.dtype).T

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.pipe, prompts)  # inference applies the map to the negative prompt too

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def export(self, manifest: AdaptorManifest) -> Adaptor:
        """The map as a PEFT LoRA on the token embedding: lora_embedding_A = M E^T, lora_embedding_B = B.

        diffusers' loader infers a text-encoder file's format, and the rank, from its attention keys, so a
        LoRA of the same rank with zero weights on the first layer's query projection goes with it; it
        changes nothing.
        """
        te = self.pipe.text_encoder
        rank = self.read_matrix().shape[0]
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=r".*(token_embedding|layers\.0\.self_attn\.q_proj)")
        te.add_adapter(config, adapter_name=_EXPORT_ADAPTER)
        try:
            table = te.get_input_embeddings().base_layer.weight
            with torch.no_grad():
                for name, p in te.named_parameters():
                    if _EXPORT_ADAPTER not in name:
                        continue
                    if "lora_embedding_A" in name:
                        read = self.read_matrix() @ table.T
                        read = read if self.centre is None else read - self.centre[:, None]
                        read[:, self.kept_ids] = 0.0  # the tokens the map leaves as they are
                        p.copy_(read.to(p.dtype))
                    elif "lora_embedding_B" in name:
                        p.copy_(self.write_matrix().to(p.dtype))
                    else:
                        p.zero_()
            manifest.kind = LoraAdaptor.kind
            return LoraAdaptor(manifest, lora_state_dict(self.pipe, _EXPORT_ADAPTER))
        finally:
            remove_adapter(self.pipe, _EXPORT_ADAPTER)

    def remove(self) -> None:
        self._hook.remove()


SYMMETRIC_INIT_NORM = 0.3  # each direction's starting length: it takes 9% of a token's component along it out
SPAN_TOLERANCE = 1e-2  # singular values below this share of the largest are rounding, not a direction
# `regressed_map`'s ridge, as a share of the words' mean variance: on the neutral-looks testbed, with leans that
# are the share's sign, 1e-3 to 1e-2 move the held-out words by 0.88 to 1.04 of the exact rule; 0 explodes
REGRESSION_RIDGE = 3e-3


def prompt_span(pipe, prompts: list[str], varying_only: bool = False, positive_only: bool = False) -> torch.Tensor:
    """An orthonormal basis (dim x k) of the token embeddings in `prompts` and the empty negative prompt.

    `varying_only`: of the tokens that differ between prompts, orthogonal to every token all of them share
    (the template's words, BOS, EOS, padding), so that a map reading this basis leaves the shared tokens, and
    with them the empty negative prompt, exactly as they were. Reading the whole span lets a finetune move
    the template's words, one push common to every prompt of the template, held-out ones included: on the
    neutral-looks testbed 200 iterations with `preserve_region: all` left every held-out occupation 30-40%
    female (fairness_dft.json, `_token_map_span_r2_region_all_200`). Reading only the varying words fitted
    the training words as well but moved held-out ones less (`_token_map_varying_*`), so it is an option.

    `positive_only`: orthogonal to the empty prompt's tokens alone, so the map leaves the negative prompt as it
    was and still reads the template's words. A map that moves the negative prompt moves the unconditional
    branch, and classifier-free guidance pushes every prompt the opposite way."""
    ids, shared = _prompt_tokens(pipe, prompts)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    present = torch.unique(ids)
    if positive_only:  # the span orthogonal to the empty prompt's tokens (BOS, EOS, padding): the negative prompt
        negative = _orthonormal_basis(table[torch.unique(ids[-1]).to(table.device)].double(), tolerance=1e-9)
        rows = table[present.to(table.device)].double()
        return _orthonormal_basis(rows - (rows @ negative) @ negative.T).to(table.dtype)
    if not varying_only:
        return _orthonormal_basis(table[present.to(table.device)].double()).to(table.dtype)
    varying = [t for t in present.tolist() if t not in shared]
    if not varying:
        raise ValueError("prompts: every token is shared by all prompts; a map that reads only what varies has nothing to read")
    fixed = _orthonormal_basis(table[sorted(shared)].double(), tolerance=1e-9)  # all of it, or some would be read
    rows = table[varying].double()
    return _orthonormal_basis(rows - (rows @ fixed) @ fixed.T).to(table.dtype)


def kept_token_ids(pipe, prompts: list[str], keep: str) -> torch.Tensor:
    """The token ids a token map leaves exactly as they are, whatever it reads from them.

    "specials": the sequence markers (BOS, and EOS, which the testbed's tokenizer also pads with). The empty
    negative prompt is nothing else, so the map leaves the unconditional branch alone; `token_map_read:
    positive` did that by reading nothing those tokens span, which also took the words' gender direction
    partly out of what the map could read. "shared": also every token all training prompts share (the
    template's words), so the map moves the varying words alone, as the exact rule does (it moves the
    occupation words' rows and nothing else). "none": every token."""
    if keep == "none":
        return torch.zeros(0, dtype=torch.long)
    specials = set(pipe.tokenizer.all_special_ids)
    if keep == "shared":
        specials |= _prompt_tokens(pipe, prompts)[1]
    return torch.tensor(sorted(specials), dtype=torch.long)


def _prompt_tokens(pipe, prompts: list[str]) -> tuple[torch.Tensor, set[int]]:
    """The token ids of `prompts` and then of the empty prompt, and the tokens every one of them has (the
    template's words, BOS, EOS, padding)."""
    ids = pipe.tokenizer(list(prompts) + [""], padding="max_length", truncation=True, return_tensors="pt").input_ids
    shared = set(ids[-1].tolist()) | set.intersection(*(set(row.tolist()) for row in ids[:-1]))
    return ids, shared


def varying_word_embeddings(pipe, prompts: list[str]) -> np.ndarray:
    """prompts x dim: the mean embedding of each prompt's tokens that not every prompt has (its own words)."""
    ids, shared = _prompt_tokens(pipe, prompts)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().double().cpu().numpy()
    rows = []
    for row in ids[:-1]:
        own = [t for t in row.tolist() if t not in shared]
        if not own:
            raise ValueError(f"prompts: {prompts[len(rows)]!r} has no word the other prompts lack; the rule cannot be measured")
        rows.append(table[own].mean(0))
    return np.stack(rows)


def measured_directions(words: np.ndarray, leanings: np.ndarray) -> tuple[np.ndarray, int]:
    """Orthonormal directions (dim x dim, best first) along which `words` (prompts x dim) co-vary with
    `leanings` (prompts x classes), and how many of them carry any covariance.

    The cross-covariance's left singular vectors: on a world where each look's words lean both ways equally
    the looks cancel and the first one is the attribute's own axis; in general it is the least-squares guess
    of it from the training words alone."""
    cov = (words - words.mean(0)).T @ (leanings - leanings.mean(0))  # dim x classes
    u, values, _ = np.linalg.svd(cov, full_matrices=True)
    found = int((values > 1e-9 * max(values.max(initial=0.0), 1e-300)).sum()) if values.size else 0
    return u, found


def regressed_map(
    words: np.ndarray, leanings: np.ndarray, rank: int, ridge: float = REGRESSION_RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """(read, write), each dim x r (r <= rank): the oblique map x -> x - write @ read.T @ x that moves each word
    by how far the regression of its lean on the words says it leans.

    Taking a direction out (`measured_directions`, the symmetric form) moves a word by its whole component along
    that direction, its look's share of it included, so a word whose look happens to lie along the axis is moved
    too far or too little (on the neutral-looks testbed the true axis moves the held-out words by 0.70 to 1.15 of
    the exact rule). The read here is instead the ridge regression of the leans on the words, which answers
    "how far does this word lean" from the training words' own variation, and the write is the words'
    regression on that reading, which says where a word that leans that much sits. Ridge (a share `ridge` of the
    words' mean variance) because leans read at a strong guidance scale are nearly the sign of the share, which
    no linear read fits exactly: unregularised, the fit explodes along directions with little variance."""
    # through the origin, not about the words' mean: the map has no offset (one would move every token, the
    # template's and the padding too), so a word's reading itself must be its lean, the mean word's included
    gram = words.T @ words
    scale = ridge * max(float(np.trace(gram)) / max(gram.shape[0], 1), 1e-300)
    coef = np.linalg.solve(gram + scale * np.eye(gram.shape[0]), words.T @ leanings)  # dim x classes
    # the classes' fitted leans share few directions (two classes: one); keep the strongest `rank`
    _, values, vt = np.linalg.svd(words @ coef, full_matrices=False)
    keep = min(rank, int((values > 1e-9 * max(values.max(initial=0.0), 1e-300)).sum()))
    read = coef @ vt[:keep].T  # dim x r
    # the write is how the words move with their reading (about the mean, the slope of that relation)
    x = words - words.mean(0)
    z = x @ read
    write = x.T @ z @ np.linalg.pinv(z.T @ z)  # dim x r
    return read, write


def _orthonormal_basis(rows: torch.Tensor, tolerance: float = SPAN_TOLERANCE) -> torch.Tensor:
    """dim x k: the directions the rows span, dropping singular values below `tolerance` of the largest."""
    _, values, vt = torch.linalg.svd(rows, full_matrices=False)
    return vt[values > tolerance * values[0]].T


def make_trainable(
    pipe,
    train: str,
    rank: int,
    num_tokens: int,
    seed: int,
    init_scale: float,
    text_modules: str = "attention_mlp",
    unet_modules: str = "attention",
    prompts: list[str] | None = None,
    token_map_read: str = "span",
    token_map_form: str = "free",
    leanings: np.ndarray | None = None,
    token_map_init: str = "measured",
    regression_scale: float = 1.0,
    token_map_keep: str = "none",
    token_map_train: str = "both",
) -> Trainable:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if train == "prefix":
        return PrefixTrainable(pipe, num_tokens, seed, init_scale)
    if text_modules == "token_map":  # never a per-word embedding LoRA through LoraTrainable
        if train != "text_encoder":
            raise ValueError("hyperparameters.text_encoder_modules: token_map needs train text_encoder")
        if not prompts:
            raise ValueError("prompts: the token map needs the training prompts to find the span it reads")
        return TokenMapTrainable(pipe, rank, seed, prompts, token_map_read, token_map_form, leanings,
                                 token_map_init, regression_scale, token_map_keep, token_map_train)  # fmt: skip
    return LoraTrainable(pipe, train, rank, seed, text_modules, unet_modules)
