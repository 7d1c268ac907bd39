"""Both adaptor kinds against the shared checks, plus what is specific to each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.generation import load_pipeline
from adaptors.lora import LORA_WEIGHTS_NAME, loaded_adapters
from adaptors.prefix import PREFIX_KEY, encode_with_prefix, init_prefix, make_prompt_encoder, tokenize_for_prefix
from tests.adaptors.conftest import pipeline_path
from tests.adaptors.mixin import (
    AdaptorTesterMixin,
    assert_same_state,
    base_state,
    make_lora,
    make_prefix,
    manifest_for,
    run,
)


class TestLoraAdaptor(AdaptorTesterMixin):
    kind = "lora"

    def make(self, pipe, adaptor_id, seed):
        return make_lora(str(pipeline_path()), adaptor_id, seed)

    def test_file_loads_in_plain_diffusers(self, pipe, tmp_path: Path):
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        adaptor.activate(pipe)
        expected = run(pipe, adaptor)
        adaptor.save(tmp_path)
        assert (tmp_path / LORA_WEIGHTS_NAME).is_file()
        plain = load_pipeline(str(pipeline_path()), device="cpu")
        plain.load_lora_weights(str(tmp_path))
        assert torch.allclose(run(plain), expected, atol=1e-6)

    def test_unet_only_and_text_encoder_only_do_not_leak(self, pipe):
        """Activating a UNet-only LoRA must switch off a text-encoder-only one, and back."""
        base, state = run(pipe), base_state(pipe)
        unet_only = make_lora(str(pipeline_path()), "u", 1, components=("unet",))
        te_only = make_lora(str(pipeline_path()), "t", 2, components=("text_encoder",))
        outs = {}
        current = base
        for adaptor in (unet_only, te_only):
            adaptor.attach(pipe)
            assert torch.equal(run(pipe), current), "attaching must not change the output"
            adaptor.activate(pipe)
            outs[adaptor.id] = current = run(pipe)
        assert loaded_adapters(pipe) == {"unet": {"u"}, "text_encoder": {"t"}}
        unet_only.activate(pipe)
        assert torch.equal(run(pipe), outs["u"])
        te_only.activate(pipe)
        assert torch.equal(run(pipe), outs["t"])
        te_only.detach(pipe)
        unet_only.activate(pipe)
        assert torch.equal(run(pipe), outs["u"])
        unet_only.detach(pipe)
        assert torch.equal(run(pipe), base)
        assert_same_state(state, base_state(pipe))

    def test_lora_from_pipe(self, pipe):
        from peft import LoraConfig

        from adaptors.lora import lora_from_pipe, lora_state_dict

        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]), adapter_name="trained")
        adaptor = lora_from_pipe(pipe, manifest_for("x", "whatever"), adapter_name="trained")
        assert adaptor.kind == adaptor.manifest.kind == "lora"
        assert adaptor.components() == ["unet"] and all(".lora." in k for k in adaptor.tensors)
        with pytest.raises(ValueError, match="nope"):
            lora_state_dict(pipe, "nope")

    def test_never_fuses(self, pipe):
        state = base_state(pipe)
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        adaptor.activate(pipe)
        after = {k.replace(".base_layer", ""): v for k, v in base_state(pipe).items() if "lora_" not in k}
        assert all(torch.equal(state[k], after[k]) for k in state)


class TestPrefixAdaptor(AdaptorTesterMixin):
    kind = "prefix_tokens"

    def make(self, pipe, adaptor_id, seed):
        return make_prefix(pipe, adaptor_id, seed)

    def test_no_prefix_equals_the_text_encoder(self, pipe):
        prompts = ["a photo of a doctor", "a photo of a nurse " + "with long hair " * 10]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            assert torch.equal(encode_with_prefix(pipe.text_encoder, ids, None), pipe.text_encoder(ids)[0])

    def test_prefix_goes_after_bos_and_keeps_eos_last(self, pipe):
        ids = tokenize_for_prefix(pipe, ["a photo of a nurse " + "with long hair " * 10], 5)
        assert ids.shape[1] == pipe.tokenizer.model_max_length - 5
        assert ids[0, 0] == pipe.tokenizer.bos_token_id and ids[0, -1] == pipe.tokenizer.eos_token_id
        prefix = init_prefix(pipe, 5)
        emb = make_prompt_encoder(pipe, prefix)(["a photo of a doctor"])
        assert emb.shape == (1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)

    def test_differentiable_in_the_prefix(self, pipe):
        pipe.text_encoder.requires_grad_(False)
        prefix = init_prefix(pipe, 3).requires_grad_(True)
        make_prompt_encoder(pipe, prefix)(["a photo of a doctor"]).square().sum().backward()
        assert prefix.grad is not None and prefix.grad.abs().sum() > 0

    def test_weights_file(self, pipe, tmp_path: Path):
        adaptor = self.make(pipe, "a", 1)
        adaptor.save(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "prefix.safetensors"]
        assert adaptor.tensors[PREFIX_KEY].shape == (5, pipe.text_encoder.config.hidden_size)
