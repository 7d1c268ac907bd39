"""Checks every adaptor kind must pass, plus factories for seeded, non-trivial adaptors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from adaptors.base import Adaptor
from adaptors.generation import GenerationSpec, generate, load_pipeline
from adaptors.loading import load_adaptor
from common.adaptor_manifest import MANIFEST_NAME, AdaptorManifest
from tests.adaptors.conftest import pipeline_path

SPEC = GenerationSpec(prompt="a photo of a doctor", num_images=2, seed=3, steps=2, guidance_scale=3.0)


def manifest_for(adaptor_id: str, kind: str, base_model: str = "testbed") -> AdaptorManifest:
    return AdaptorManifest(
        id=adaptor_id,
        kind=kind,
        base_model=base_model,
        attributes=["gender"],
        target={"gender": {"female": 0.5, "male": 0.5}},
        sampler={"steps": 2, "guidance_scale": 3.0, "scheduler": "DDIMScheduler"},
    )


def make_lora(pipe_path: str, adaptor_id: str, seed: int, components=("unet", "text_encoder")) -> Adaptor:
    """A LoRA with random (non-zero) B matrices, made once per (seed, components) on a separate pipeline."""
    from adaptors.lora import LoraAdaptor

    tensors = _lora_tensors(pipe_path, seed, tuple(components))
    return LoraAdaptor(manifest_for(adaptor_id, "lora"), {k: v.clone() for k, v in tensors.items()})


@lru_cache(maxsize=8)
def _lora_tensors(pipe_path: str, seed: int, components: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from peft import LoraConfig

    from adaptors.lora import lora_state_dict

    maker = load_pipeline(pipe_path, device="cpu")
    torch.manual_seed(seed)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    for component in components:
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets[component])
        getattr(maker, component).add_adapter(config)
    for component in components:
        for module in getattr(maker, component).modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.3)
    return lora_state_dict(maker)


def make_prefix(pipe, adaptor_id: str, seed: int, num_tokens: int = 5) -> Adaptor:
    from adaptors.prefix import PREFIX_KEY, PrefixAdaptor, init_prefix

    prefix = init_prefix(pipe, num_tokens, seed=seed, scale=3.0)
    return PrefixAdaptor(manifest_for(adaptor_id, "prefix_tokens"), {PREFIX_KEY: prefix})


def run(pipe, adaptor: Adaptor | None = None) -> torch.Tensor:
    encoder = adaptor.prompt_encoder(pipe) if adaptor is not None else None
    return generate(pipe, SPEC, encode_prompt=encoder)


def base_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "vae") for k, v in
            getattr(pipe, c).state_dict().items()}  # fmt: skip


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert sorted(before) == sorted(after), "the pipeline's modules changed (adaptor layers left behind?)"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base weights changed: {changed[:5]}"


class AdaptorTesterMixin:
    """Subclasses set `kind` and implement `make(pipe, adaptor_id, seed)`; `pipe` is the conftest fixture."""

    kind: str

    def make(self, pipe, adaptor_id: str, seed: int) -> Adaptor:
        raise NotImplementedError

    def test_kind_and_bytes(self, pipe):
        adaptor = self.make(pipe, "a", 1)
        assert adaptor.kind == self.kind == adaptor.manifest.kind
        assert adaptor.nbytes() == sum(t.numel() * t.element_size() for t in adaptor.tensors.values()) > 0

    def test_changes_the_output(self, pipe):
        base = run(pipe)
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        adaptor.activate(pipe)
        assert (run(pipe, adaptor) - base).abs().max() > 1e-3

    def test_save_load_round_trip(self, pipe, tmp_path: Path):
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        adaptor.activate(pipe)
        expected = run(pipe, adaptor)
        adaptor.save(tmp_path / "a")
        assert (tmp_path / "a" / MANIFEST_NAME).is_file()
        assert set(adaptor.manifest.files) == {adaptor.weights_name}
        loaded = load_adaptor(tmp_path / "a")
        assert type(loaded) is type(adaptor)
        assert loaded.manifest.to_dict() == adaptor.manifest.to_dict()
        assert sorted(loaded.tensors) == sorted(adaptor.tensors)
        assert all(torch.equal(loaded.tensors[k], adaptor.tensors[k]) for k in adaptor.tensors)
        fresh = load_pipeline(str(pipeline_path()), device="cpu")
        loaded.attach(fresh)
        loaded.activate(fresh)
        assert torch.equal(run(fresh, loaded), expected)

    def test_removing_restores_the_base_exactly(self, pipe):
        base, state = run(pipe), base_state(pipe)
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        adaptor.activate(pipe)
        run(pipe, adaptor)
        adaptor.deactivate(pipe)
        assert torch.equal(run(pipe), base)
        adaptor.detach(pipe)
        assert torch.equal(run(pipe), base)
        assert_same_state(state, base_state(pipe))

    def test_swap_a_b_a(self, pipe):
        a, b = self.make(pipe, "a", 1), self.make(pipe, "b", 2)
        a.attach(pipe)
        a.activate(pipe)
        out_a = run(pipe, a)
        b.attach(pipe)
        assert torch.equal(run(pipe, a), out_a), "attaching another adaptor must not change the active one"
        b.activate(pipe)
        out_b = run(pipe, b)
        a.activate(pipe)
        assert torch.equal(run(pipe, a), out_a)
        assert (out_a - out_b).abs().max() > 1e-3
        b.activate(pipe)
        assert torch.equal(run(pipe, b), out_b)

    def test_load_adaptor_names_the_path(self, pipe, tmp_path: Path):
        adaptor = self.make(pipe, "a", 1)
        adaptor.save(tmp_path / "a")
        manifest = AdaptorManifest.read(tmp_path / "a")
        manifest.kind = "no-such-kind"
        manifest.write(tmp_path / "a")
        with pytest.raises(ValueError, match=str(tmp_path / "a")):
            load_adaptor(tmp_path / "a")
        with pytest.raises(FileNotFoundError, match="nowhere"):
            load_adaptor(tmp_path / "nowhere")
