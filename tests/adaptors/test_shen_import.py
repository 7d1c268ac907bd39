"""`fairdiff adaptors import-shen`: Shen et al.'s (ICLR 2024) released checkpoints as store adaptors.

The checkpoints here are made in their exact file layout (plain `torch.save` dicts, diffusers
~0.17 key names) with the testbed's dimensions, then imported through the real CLI. The result
is checked against independent references written in this file: a copy of each model with
W += up @ down merged by hand (what their LoRALinearLayer / LoRAAttnProcessor compute), and
their own prefix mechanism (placeholder tokens added to the tokenizer, prepended to the prompt).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from adaptors.generation import GenerationSpec, generate, load_pipeline
from adaptors.prefix import PrefixAdaptor
from adaptors.shen_import import (
    PREFIX_FILE,
    SHEN_SAMPLER,
    TEXT_ENCODER_FILE,
    UNET_FILE,
    ShenImportError,
    convert_checkpoint_folder,
    layout_of,
    load_layout,
)
from adaptors.store import AdaptorStore
from tests.adaptors.conftest import pipeline_path
from tests.support.models import load_testbed_pipeline
from workers.cli import main

RANK = 4
NUM_TOKENS = 5
PROMPTS = ["a photo of the face of a nurse, a person", "a photo of the face of a senator, a person"]
ID = "shen-test"
TE_LAYERS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}


# -- their files, made with the testbed's dimensions ------------------------------------------------
def _pair(g: torch.Generator, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, in_features, generator=g) * 0.1, torch.randn(out_features, RANK, generator=g) * 0.1


def text_encoder_layer(text_encoder, shen_key: str) -> torch.nn.Linear:
    """The Linear a text-encoder key patches (their keys say `text_model.`; transformers 5 dropped that level)."""
    path = shen_key.removesuffix(".lora_linear_layer.down.weight").removesuffix(".lora_linear_layer.up.weight")
    if not hasattr(text_encoder, "text_model"):
        path = path.removeprefix("text_model.")
    return text_encoder.get_submodule(path)


def unet_layer(unet, shen_key: str) -> torch.nn.Linear:
    """The Linear a LoRAAttnProcessor key patches: `<attn>.processor.to_out_lora.*` -> `<attn>.to_out[0]`."""
    processor, proj = shen_key.split(".processor.")
    attn = unet.get_submodule(processor)
    name = proj.split("_lora.")[0]
    return attn.to_out[0] if name == "to_out" else getattr(attn, name)


def shen_text_encoder(pipe, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(pipe.text_encoder.config.num_hidden_layers):
        for layer in sorted(TE_LAYERS):
            stem = f"text_model.encoder.layers.{i}.{layer}.lora_linear_layer"
            linear = text_encoder_layer(pipe.text_encoder, f"{stem}.down.weight")
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = _pair(g, linear.in_features, linear.out_features)
    return sd


def shen_unet(pipe, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for processor in pipe.unet.attn_processors:  # "<block>.attentions.a.transformer_blocks.0.attn1.processor"
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            stem = f"{processor}.{proj}_lora"
            linear = unet_layer(pipe.unet, f"{stem}.down.weight")
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = _pair(g, linear.in_features, linear.out_features)
    return sd


def shen_prefix(pipe, seed: int = 3) -> dict[str, torch.Tensor]:
    """Their FairEmbeddings state dict: [0; K tokens] plus the copied position embedding and ids."""
    embeddings = pipe.text_encoder.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(NUM_TOKENS + 1, embeddings.shape[1])
    table[1:] = embeddings.mean(0) + torch.randn(NUM_TOKENS, embeddings.shape[1], generator=g) * embeddings.std() * 3
    max_positions = pipe.text_encoder.config.max_position_embeddings
    position = pipe.text_encoder.get_submodule("embeddings.position_embedding").weight.detach().clone()
    return {
        "position_ids": torch.arange(max_positions).expand((1, -1)),
        "position_embedding.weight": position,
        "token_embedding.weight": table,
    }


def write_checkpoint(root: Path, files: dict[str, dict], experiment: str = "exp-1-debias-gender") -> Path:
    """A folder laid out like their downloads, holding `files` (name -> object to torch.save)."""
    folder = root / experiment / "outputs/from-paper_finetune-text-encoder-and-unet_09190230/checkpoint-12200_exported"
    folder.mkdir(parents=True)
    for name, obj in files.items():
        torch.save(obj, folder / name)
    return folder


def all_files(pipe) -> dict[str, dict]:
    return {TEXT_ENCODER_FILE: shen_text_encoder(pipe), UNET_FILE: shen_unet(pipe), PREFIX_FILE: shen_prefix(pipe)}


# -- references -------------------------------------------------------------------------------------
def merged(model: torch.nn.Module, sd: dict[str, torch.Tensor], layer_of: Callable) -> torch.nn.Module:
    """A copy of `model` with W += up @ down for every pair: what their LoRA layers add at scale 1."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for key, down in sd.items():
            if key.endswith(".down.weight"):
                up = sd[key.removesuffix(".down.weight") + ".up.weight"]
                layer_of(model, key).weight += up @ down
    return model


def token_ids(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def unet_inputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    return {
        "sample": torch.randn(2, pipe.unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(
            2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, generator=g
        ),
    }


@torch.no_grad()
def encode(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids)[0]


@torch.no_grad()
def denoise(unet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(**inputs).sample


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    """The shared, read-only testbed pipeline: only its shapes and weights are read here."""
    return load_testbed_pipeline()


@pytest.fixture(scope="module")
def layout():
    return load_layout("testbed")


@pytest.fixture(scope="module")
def imported(base, tmp_path_factory: pytest.TempPathFactory):
    """All three files imported once through the CLI: (checkpoint folder, their tensors, store)."""
    root = tmp_path_factory.mktemp("shen")
    files = all_files(base)
    folder = write_checkpoint(root, files)
    store_dir = root / "store"
    assert main(["adaptors", "import-shen", str(folder), "--base-model", "testbed", "--id", ID, "--store", str(store_dir)]) == 0
    return folder, files, AdaptorStore(store_dir)


def run_cli(folder: Path, store: Path, *extra: str) -> int:
    return main(["adaptors", "import-shen", str(folder), "--base-model", "testbed", "--store", str(store), *extra])


# -- the conversion ---------------------------------------------------------------------------------
def test_layout_from_configs_matches_the_loaded_pipeline(base, layout):
    assert layout == layout_of(base.text_encoder, base.unet)


def test_cli_publishes_a_lora_and_a_prefix_adaptor_with_provenance(imported):
    folder, _, store = imported
    manifests = {m.id: m for m in store.list()}
    assert set(manifests) == {f"{ID}-lora", f"{ID}-prefix"}
    lora, prefix = manifests[f"{ID}-lora"], manifests[f"{ID}-prefix"]
    assert (lora.kind, prefix.kind) == ("lora", "prefix_tokens")
    for m in (lora, prefix):
        store.verify(m.id)
        assert m.base_model == "testbed"
        assert m.target == {"gender": {"female": 0.5, "male": 0.5}} and m.attributes == ["gender"]
        assert m.sampler == SHEN_SAMPLER
        assert m.sampler["scheduler"] == "DPMSolverMultistepScheduler" and m.sampler["steps"] == 30
        assert m.provenance["imported_from"] == "shen2024"
        assert m.provenance["source"] == (
            "exp-1-debias-gender/outputs/from-paper_finetune-text-encoder-and-unet_09190230/checkpoint-12200_exported"
        )
        for name, digest in m.provenance["source_files"].items():
            assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert set(lora.provenance["source_files"]) == {TEXT_ENCODER_FILE, UNET_FILE}
    assert set(prefix.provenance["source_files"]) == {PREFIX_FILE}
    assert lora.hyperparameters == {"components": ["text_encoder", "unet"], "rank": [RANK], "lora_scale": 1.0}
    assert prefix.hyperparameters["num_tokens"] == NUM_TOKENS


def test_lora_equals_their_merged_weights(imported, pipe):
    _, files, store = imported
    ref_te = merged(pipe.text_encoder, files[TEXT_ENCODER_FILE], text_encoder_layer)
    ref_unet = merged(pipe.unet, files[UNET_FILE], unet_layer)
    ids, inputs = token_ids(pipe, PROMPTS), unet_inputs(pipe)
    base_hidden, base_eps = encode(pipe.text_encoder, ids), denoise(pipe.unet, inputs)

    adaptor = store.load(f"{ID}-lora")
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    hidden, eps = encode(pipe.text_encoder, ids), denoise(pipe.unet, inputs)
    torch.testing.assert_close(hidden, encode(ref_te, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, denoise(ref_unet, inputs), atol=1e-5, rtol=1e-5)
    assert (hidden - base_hidden).abs().max() > 0.05 and (eps - base_eps).abs().max() > 0.01  # a real change

    reference = StableDiffusionPipeline(**{**pipe.components, "text_encoder": ref_te, "unet": ref_unet})
    reference.set_progress_bar_config(disable=True)
    spec = GenerationSpec(prompt=PROMPTS[0], num_images=2, seed=5, steps=3, guidance_scale=5.0)
    torch.testing.assert_close(generate(pipe, spec), generate(reference, spec), atol=1e-4, rtol=1e-4)

    adaptor.deactivate(pipe)
    torch.testing.assert_close(encode(pipe.text_encoder, ids), base_hidden, atol=0, rtol=0)


def test_lora_file_loads_in_plain_diffusers(imported):
    _, files, store = imported
    plain = load_pipeline(str(pipeline_path()), device="cpu")
    ref_te = merged(plain.text_encoder, files[TEXT_ENCODER_FILE], text_encoder_layer)
    ref_unet = merged(plain.unet, files[UNET_FILE], unet_layer)
    plain.load_lora_weights(str(store.path(f"{ID}-lora")))
    ids, inputs = token_ids(plain, PROMPTS), unet_inputs(plain)
    torch.testing.assert_close(encode(plain.text_encoder, ids), encode(ref_te, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoise(plain.unet, inputs), denoise(ref_unet, inputs), atol=1e-5, rtol=1e-5)


def test_prefix_equals_their_placeholder_tokens_after_bos(imported, pipe):
    """Their generation: add <common-token1..K> to the tokenizer with the trained rows, prepend them to the prompt."""
    _, files, store = imported
    table = files[PREFIX_FILE]["token_embedding.weight"]
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    names = [f"<common-token{i + 1}>" for i in range(NUM_TOKENS)]
    assert tokenizer.add_tokens(names) == NUM_TOKENS
    new_ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[new_ids] = table[1:]
    ids = tokenizer(
        ["".join(names) + p for p in PROMPTS],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids[:, 1 : 1 + NUM_TOKENS].tolist() == [new_ids] * len(PROMPTS)  # right after BOS
    expected = encode(text_encoder, ids)

    adaptor = store.load(f"{ID}-prefix")
    assert isinstance(adaptor, PrefixAdaptor) and adaptor.num_tokens == NUM_TOKENS
    adaptor.attach(pipe)
    adaptor.activate(pipe)
    with torch.no_grad():
        got = adaptor.prompt_encoder(pipe)(PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_single_file_folder_target_and_name(base, tmp_path: Path, capsys):
    folder = write_checkpoint(tmp_path, {UNET_FILE: shen_unet(base)})
    target = {"gender": {"female": 0.3, "male": 0.7}}
    assert run_cli(folder, tmp_path / "store", "--target", json.dumps(target), "--name", "Fair UNet") == 0
    (manifest,) = AdaptorStore(tmp_path / "store").list()
    assert manifest.id == "shen-finetune-text-encoder-and-unet_09190230-ckpt12200-lora"  # the default id
    assert (manifest.target, manifest.name) == (target, "Fair UNet")
    assert manifest.hyperparameters["components"] == ["unet"]
    assert f"imported {manifest.id} (lora" in capsys.readouterr().out


def test_default_target_warns_for_experiments_beyond_gender(base, layout, tmp_path: Path, caplog):
    folder = write_checkpoint(tmp_path, {UNET_FILE: shen_unet(base)}, experiment="exp-3-debias-gender-race")
    with caplog.at_level("WARNING", logger="adaptors.shen_import"):
        (adaptor,) = convert_checkpoint_folder(folder, layout, "testbed")
    assert "exp-3-debias-gender-race was not trained for the default target" in caplog.text
    assert adaptor.manifest.provenance["source"].startswith("exp-3-debias-gender-race/outputs/")
    caplog.clear()
    with caplog.at_level("WARNING", logger="adaptors.shen_import"):
        convert_checkpoint_folder(folder, layout, "testbed", target={"gender": {"female": 0.5, "male": 0.5}})
    assert caplog.text == ""


# -- what is refused --------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code (writes a marker file): a stand-in for a booby-trapped checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('executed')",))


def not_a_tensor() -> None:
    """A function stored in a checkpoint: refused like any global outside torch's allow-list."""


@pytest.mark.parametrize("file_name", [TEXT_ENCODER_FILE, UNET_FILE, PREFIX_FILE])
def test_pickle_carrying_code_is_refused_and_never_executed(base, tmp_path: Path, capsys, file_name: str):
    marker = tmp_path / "executed.txt"
    files = all_files(base)
    files[file_name] = {**files[file_name], "extra": Payload(marker)}
    folder = write_checkpoint(tmp_path, files)
    assert run_cli(folder, tmp_path / "store") == 2
    err = capsys.readouterr().err
    assert file_name in err and "refused" in err and "weights_only" in err
    assert not marker.exists()
    assert AdaptorStore(tmp_path / "store").list() == []

    control = tmp_path / "control.txt"  # the payload is live: an unsafe load would have run it
    torch.save({"x": Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.read_text() == "executed"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"token_embedding.weight": torch.zeros(6, 64), "hook": not_a_tensor}, "refused"),
        ([torch.zeros(6, 64)], "expected a dict of tensors"),
        ({"token_embedding.weight": torch.zeros(6, 64), "position_ids": 3}, "position_ids: expected a tensor"),
        ({}, "holds no tensors"),
    ],
)
def test_files_that_are_not_a_dict_of_tensors_are_refused(tmp_path: Path, layout, obj, message: str):
    folder = write_checkpoint(tmp_path, {PREFIX_FILE: obj})
    with pytest.raises(ShenImportError, match=message) as info:
        convert_checkpoint_folder(folder, layout, "testbed")
    assert PREFIX_FILE in str(info.value)


def test_truncated_file_is_refused(tmp_path: Path, layout, base):
    folder = write_checkpoint(tmp_path, {UNET_FILE: shen_unet(base)})
    data = (folder / UNET_FILE).read_bytes()
    (folder / UNET_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShenImportError, match=f"{UNET_FILE}: refused"):
        convert_checkpoint_folder(folder, layout, "testbed")


TE_Q = "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
UNET_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"


def _edit_te(sd: dict) -> None:
    sd[f"{TE_Q}.middle.weight"] = torch.zeros(RANK, 64)


def _edit_unet_unknown(sd: dict) -> None:
    sd[UNET_Q.replace("to_k_lora", "to_x_lora") + ".down.weight"] = torch.zeros(RANK, 64)


def _edit_shape(sd: dict) -> None:
    sd[f"{UNET_Q}.down.weight"] = torch.zeros(RANK, 63)


def _edit_rank(sd: dict) -> None:
    sd[f"{TE_Q}.up.weight"] = torch.zeros(64, RANK + 1)


def _edit_missing_layer(sd: dict) -> None:
    sd[f"{TE_Q.replace('layers.0', 'layers.7')}.down.weight"] = torch.zeros(RANK, 64)
    sd[f"{TE_Q.replace('layers.0', 'layers.7')}.up.weight"] = torch.zeros(64, RANK)


def _edit_partner(sd: dict) -> None:
    del sd[f"{UNET_Q}.up.weight"]


def _edit_nan(sd: dict) -> None:
    sd[f"{TE_Q}.down.weight"][0, 0] = float("nan")


def _edit_int(sd: dict) -> None:
    sd[f"{UNET_Q}.down.weight"] = sd[f"{UNET_Q}.down.weight"].long()


@pytest.mark.parametrize(
    ("file_name", "edit", "message"),
    [
        (TEXT_ENCODER_FILE, _edit_te, rf"unknown key '{TE_Q}\.middle\.weight'"),
        (UNET_FILE, _edit_unet_unknown, r"unknown key '.*to_x_lora\.down\.weight'"),
        (UNET_FILE, _edit_shape, rf"{UNET_Q}\.down\.weight: shape \[4, 63\], expected \[rank, 64\]"),
        (TEXT_ENCODER_FILE, _edit_rank, rf"{TE_Q}\.up\.weight: shape \[64, 5\], expected \[64, 4\]"),
        (TEXT_ENCODER_FILE, _edit_missing_layer, "the base model has no layer 'encoder.layers.7.self_attn.q_proj'"),
        (UNET_FILE, _edit_partner, rf"{UNET_Q}\.down\.weight: its 'up' partner is missing"),
        (TEXT_ENCODER_FILE, _edit_nan, rf"{TE_Q}\.down\.weight: holds non-finite values"),
        (UNET_FILE, _edit_int, "expected floating-point weights"),
    ],
)
def test_bad_lora_files_are_rejected_naming_file_and_key(base, layout, tmp_path: Path, file_name, edit, message):
    files = {TEXT_ENCODER_FILE: shen_text_encoder(base), UNET_FILE: shen_unet(base)}
    edit(files[file_name])
    folder = write_checkpoint(tmp_path, files)
    with pytest.raises(ShenImportError, match=message) as info:
        convert_checkpoint_folder(folder, layout, "testbed")
    assert str(info.value).startswith(f"{file_name}: ")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update({"token_embedding.weight": torch.zeros(6, 32)}), "width 32, the text encoder's is 64"),
        (lambda sd: sd["token_embedding.weight"][0].fill_(1.0), "row 0 is not zero"),
        (lambda sd: sd.update({"fair_token_id_map": torch.zeros(3)}), "unknown key 'fair_token_id_map'"),
        (lambda sd: sd.update({"position_embedding.weight": torch.zeros(77, 64)}), r"shape \[77, 64\]"),
        (lambda sd: sd.pop("token_embedding.weight"), "lacks 'token_embedding.weight'"),
        (lambda sd: sd.update({"token_embedding.weight": torch.zeros(1, 64)}), "1 rows"),
    ],
)
def test_bad_prefix_files_are_rejected(base, layout, tmp_path: Path, edit, message):
    sd = shen_prefix(base)
    edit(sd)
    folder = write_checkpoint(tmp_path, {PREFIX_FILE: sd})
    with pytest.raises(ShenImportError, match=message):
        convert_checkpoint_folder(folder, layout, "testbed")


def test_one_bad_file_publishes_nothing(base, tmp_path: Path, capsys):
    files = all_files(base)
    files[PREFIX_FILE]["token_embedding.weight"][0, 0] = 1.0
    folder = write_checkpoint(tmp_path, files)
    assert run_cli(folder, tmp_path / "store") == 2
    assert "row 0 is not zero" in capsys.readouterr().err
    assert AdaptorStore(tmp_path / "store").list() == []


def test_empty_folder_and_missing_folder_are_rejected(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("not a checkpoint")
    assert run_cli(tmp_path / "empty", tmp_path / "store") == 2
    assert "holds none of" in capsys.readouterr().err
    assert run_cli(tmp_path / "nowhere", tmp_path / "store") == 2
    assert "is not a folder" in capsys.readouterr().err


def test_ids_already_in_the_store_and_bad_options_are_rejected(imported, capsys):
    folder, _, store = imported
    before = sorted(m.id for m in store.list())
    assert run_cli(folder, store.root, "--id", ID) == 2
    assert "already exist" in capsys.readouterr().err
    assert run_cli(folder, store.root, "--id", "Bad Id") == 2
    assert "is invalid" in capsys.readouterr().err
    assert run_cli(folder, store.root, "--id", "other", "--target", "{not json") == 2
    assert run_cli(folder, store.root, "--id", "other", "--target", '{"gender": {"female": 0.9, "male": 0.3}}') == 2
    assert "sum to" in capsys.readouterr().err
    assert sorted(m.id for m in store.list()) == before


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(1).expand(1 << 20, 1 << 20), "over the"),  # 4 TiB of float32 from 4 bytes of storage
        (torch.zeros(1).expand(6, 64), "strides \\[0, 0\\]"),  # small, but still a view of one number
        (torch.zeros(2000).as_strided((6, 64), (1, 1)), "not a dense layout"),  # overlapping rows
    ],
)
def test_tensors_that_claim_more_than_their_storage_are_refused_before_use(tmp_path: Path, layout, capsys, tensor,
                                                                          message: str):  # fmt: skip
    folder = write_checkpoint(tmp_path, {PREFIX_FILE: {"token_embedding.weight": tensor}})
    with pytest.raises(ShenImportError, match=message) as info:
        convert_checkpoint_folder(folder, layout, "testbed")
    assert PREFIX_FILE in str(info.value) and "token_embedding.weight" in str(info.value)
    assert run_cli(folder, tmp_path / "store") == 2
    assert "token_embedding.weight" in capsys.readouterr().err
