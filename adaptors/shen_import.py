"""Import the released checkpoints of Shen et al. (ICLR 2024) into the adaptor store.

"Finetuning Text-to-Image Diffusion Models for Fairness" (github.com/sail-sg/finetune-fair-diffusion)
publishes its debiased SD1.5 models as plain `torch.save` dicts in folders like
`exp-N/outputs/from-paper_*/checkpoint-K_exported/`, in the layouts of diffusers ~0.17:

- `text_encoder_lora_EMA.pth`: `text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj|mlp.fc{1,2}}
  .lora_linear_layer.{down,up}.weight`, applied as W + up @ down (no alpha, LoRA scale 1);
- `unet_lora_EMA.pth`: `<block>.attentions.{a}.transformer_blocks.{t}.attn{1,2}.processor.to_{q,k,v,out}_lora
  .{down,up}.weight` (LoRAAttnProcessor), also W + up @ down;
- `prefix_embedding_EMA.pth`: `token_embedding.weight` [K+1, hidden] whose row 0 is the unused
  "not a prefix token" row and rows 1..K are K soft tokens written right after BOS of the
  positive prompt (their generation script prepends `<common-token1>..<common-tokenK>`), plus
  unchanged copies of the base position embeddings (`position_*`), which are ignored.

Both LoRA files become one `LoraAdaptor` (our diffusers file layout, scale 1) and the prefix
becomes a `PrefixAdaptor`, whose encoding (token embedding + position embedding after BOS) is
exactly theirs. The files are pickles, so they are only ever read with `weights_only=True`: a
file holding anything but tensors is refused, never executed.

Key renaming reuses diffusers' own tables for these layouts (`convert_state_dict_to_peft`,
`convert_unet_state_dict_to_peft`); every resulting key is then checked against the target
model's modules and shapes, since those helpers pass unknown keys through silently.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptors.base import Adaptor
from adaptors.lora import LoraAdaptor, to_file_layout
from adaptors.prefix import PREFIX_KEY, PrefixAdaptor
from adaptors.store import AdaptorStore
from common.adaptor_manifest import AdaptorManifest, valid_adaptor_id
from common.schemas import validate_target

logger = logging.getLogger(__name__)

IMPORTED_FROM = "shen2024"
PAPER = "Shen et al., Finetuning Text-to-Image Diffusion Models for Fairness, ICLR 2024"
REPOSITORY = "https://github.com/sail-sg/finetune-fair-diffusion"

TEXT_ENCODER_FILE = "text_encoder_lora_EMA.pth"
UNET_FILE = "unet_lora_EMA.pth"
PREFIX_FILE = "prefix_embedding_EMA.pth"
SHEN_FILES = (TEXT_ENCODER_FILE, UNET_FILE, PREFIX_FILE)

# What their released generation script (gen-images.py) samples SD1.5 with; it tokenizes the
# prompt with padding=True (to the longest prompt of the batch, not to 77 tokens).
SHEN_SAMPLER: dict[str, Any] = {
    "scheduler": "DPMSolverMultistepScheduler",
    "steps": 30,
    "guidance_scale": 7.5,
    "prompt_padding": "longest",
}
DEFAULT_TARGET = {"gender": {"female": 0.5, "male": 0.5}}

_TEXT_ENCODER_KEY = re.compile(
    r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.lora_linear_layer\.(?:down|up)\.weight"
)
_UNET_KEY = re.compile(
    r"(?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\.transformer_blocks\.\d+"
    r"\.attn[12]\.processor\.to_(?:q|k|v|out)_lora\.(?:down|up)\.weight"
)
# Their largest file (UNet LoRA of SD1.5) is a few hundred MB: a file, or the tensors in it, past this is refused.
MAX_CHECKPOINT_BYTES = 2 * 1024**3
PREFIX_TOKENS_KEY = "token_embedding.weight"
PREFIX_IGNORED_KEYS = ("position_embedding.weight", "position_ids")
_PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])\.weight")


class ShenImportError(ValueError):
    """A Shen et al. checkpoint folder or file that cannot be imported; the message names file and key."""


# -- the model the adaptors are for ---------------------------------------------------------------
@dataclass(frozen=True)
class TargetLayout:
    """What the checks need of the base model: its Linear layers and the text encoder's sizes.

    `linears` maps component -> module path -> (in_features, out_features). `text_model_prefix`
    says whether the CLIP layers live under `text_model.` (transformers < 5) or at the top.
    """

    linears: Mapping[str, Mapping[str, tuple[int, int]]]
    text_model_prefix: bool
    hidden_size: int
    max_positions: int


def _linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def layout_of(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> TargetLayout:
    """The layout of base (adaptor-free) models; they may live on the meta device."""
    return TargetLayout(
        linears={"text_encoder": _linears(text_encoder), "unet": _linears(unet)},
        text_model_prefix=hasattr(text_encoder, "text_model"),
        hidden_size=int(text_encoder.config.hidden_size),
        max_positions=int(text_encoder.config.max_position_embeddings),
    )


def load_layout(base_model: str, offline: bool = True) -> TargetLayout:
    """The base model's layout from its configs alone: models are built on the meta device, no weights read."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adaptors.generation import resolve_model_path

    path = resolve_model_path(base_model)
    local_only = Path(path).is_dir() or offline
    try:
        text_config = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder", local_files_only=local_only)
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read the configs of base model {base_model!r} from {path!r}: {exc}") from exc
    with torch.device("meta"):
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel.from_config(unet_config)
    return layout_of(text_encoder, unet)


# -- reading their files, safely --------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln]
    return (useful or lines or [type(exc).__name__])[0][:300]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    """The file's str -> Tensor dict and its raw bytes (hashed for provenance: what was hashed is what was read).

    Only `torch.load(..., weights_only=True)` touches the pickle, so a file carrying code (a
    class instance, a function, any global outside torch's allow-list) fails here unexecuted.
    """
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise ShenImportError(f"{path.name}: refused: {size} bytes, over the {MAX_CHECKPOINT_BYTES}-byte limit")
    data = path.read_bytes()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError...: all mean "not importable"
        raise ShenImportError(
            f"{path.name}: refused: not a plain dict of tensors loadable with weights_only=True ({_reason(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise ShenImportError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    if not obj:
        raise ShenImportError(f"{path.name}: holds no tensors")
    total = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ShenImportError(f"{path.name}: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise ShenImportError(f"{path.name}: {key}: expected a tensor, found {type(value).__name__}")
        total += _check_layout(path.name, key, value)
        if total > MAX_CHECKPOINT_BYTES:
            raise ShenImportError(f"{path.name}: refused: its tensors hold over {MAX_CHECKPOINT_BYTES} bytes")
    return obj, data


def _check_layout(fname: str, key: str, t: torch.Tensor) -> int:
    """The bytes `t` covers, once checked to be a plain dense tensor laid out over its own storage.

    torch.load checks each storage against the bytes in the file, but a tensor is a view (shape, strides, offset)
    of its storage: a stride of 0 or overlapping strides let a few bytes of storage claim terabytes of tensor,
    which the first operation that copies it (a cast, a finiteness check) would allocate. Checked before any.
    """
    numel = t.numel()
    nbytes = numel * t.element_size()
    if nbytes > MAX_CHECKPOINT_BYTES:
        raise ShenImportError(
            f"{fname}: {key}: shape {list(t.shape)} is {nbytes} bytes, over the {MAX_CHECKPOINT_BYTES}-byte limit"
        )
    if t.layout is not torch.strided or t.is_quantized:
        raise ShenImportError(f"{fname}: {key}: expected a dense tensor, found layout {t.layout}")
    if numel and not t.is_contiguous():
        raise ShenImportError(
            f"{fname}: {key}: refused: strides {list(t.stride())} for shape {list(t.shape)} are not a dense layout "
            "(zero or overlapping strides make a small storage look like a large tensor)"
        )
    if (t.storage_offset() * t.element_size()) + nbytes > t.untyped_storage().nbytes():
        raise ShenImportError(f"{fname}: {key}: refused: the tensor reaches past its storage")
    return nbytes


def _weight(fname: str, key: str, t: torch.Tensor) -> torch.Tensor:
    """A finite 2-D floating tensor, as float32 (their files are fp32; fp16/bf16 ones are widened exactly)."""
    if not t.is_floating_point():
        raise ShenImportError(f"{fname}: {key}: expected floating-point weights, found {t.dtype}")
    if t.ndim != 2:
        raise ShenImportError(f"{fname}: {key}: expected a 2-D weight, found shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ShenImportError(f"{fname}: {key}: holds non-finite values (nan or inf)")
    return t.detach().to(torch.float32).contiguous()


# -- LoRA ------------------------------------------------------------------------------------------
def _reject_unknown(sd: Mapping[str, torch.Tensor], pattern: re.Pattern[str], fname: str) -> None:
    unknown = sorted(k for k in sd if not pattern.fullmatch(k))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ShenImportError(f"{fname}: unknown key {unknown[0]!r}{more}; not a Shen et al. {fname} layout")


def _renaming(keys: list[str], convert: Callable[[dict], dict]) -> dict[str, str]:
    """New key -> original key under a diffusers converter (it passes values through, so key->key works)."""
    renamed = convert({k: k for k in keys})
    if len(renamed) != len(keys):
        raise ShenImportError("two keys map to the same LoRA weight")
    return renamed


def _text_encoder_renaming(keys: list[str], layout: TargetLayout) -> dict[str, str]:
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    renamed = _renaming(keys, lambda sd: convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS))
    if not layout.text_model_prefix:  # transformers >= 5 flattened CLIPTextModel (diffusers strips it the same way)
        renamed = {k.removeprefix("text_model."): v for k, v in renamed.items()}
    return renamed


def _unet_renaming(keys: list[str], layout: TargetLayout) -> dict[str, str]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    return _renaming(keys, convert_unet_state_dict_to_peft)


def _lora_pair(
    fname: str, module: str, sides: dict[str, str], sd: Mapping[str, torch.Tensor], shape: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """One layer's lora_A (their `down`, [r, in]) and lora_B (`up`, [out, r]), checked against the layer."""
    some_key = next(iter(sides.values()))
    if shape is None:
        raise ShenImportError(f"{fname}: {some_key}: the base model has no layer {module!r}")
    for side, partner in (("A", "down"), ("B", "up")):
        if side not in sides:
            raise ShenImportError(f"{fname}: {some_key}: its '{partner}' partner is missing")
    down = _weight(fname, sides["A"], sd[sides["A"]])
    up = _weight(fname, sides["B"], sd[sides["B"]])
    rank = down.shape[0]
    in_features, out_features = shape
    if rank < 1 or tuple(down.shape) != (rank, in_features):
        raise ShenImportError(f"{fname}: {sides['A']}: shape {list(down.shape)}, expected [rank, {in_features}] for {module}")
    if tuple(up.shape) != (out_features, rank):
        raise ShenImportError(f"{fname}: {sides['B']}: shape {list(up.shape)}, expected [{out_features}, {rank}] for {module}")
    return {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}


def convert_lora_file(
    sd: Mapping[str, torch.Tensor], component: str, layout: TargetLayout, fname: str
) -> dict[str, torch.Tensor]:
    """One of their LoRA files as PEFT keys of `component` (`<module>.lora_A.weight`), scale 1 (alpha == r)."""
    pattern, renaming = {
        "text_encoder": (_TEXT_ENCODER_KEY, _text_encoder_renaming),
        "unet": (_UNET_KEY, _unet_renaming),
    }[component]
    _reject_unknown(sd, pattern, fname)
    by_module: dict[str, dict[str, str]] = {}
    for new, old in renaming(sorted(sd), layout).items():
        match = _PEFT_KEY.fullmatch(new)
        if match is None:  # the strict pattern above should make this impossible
            raise ShenImportError(f"{fname}: {old}: did not convert to a LoRA weight key ({new!r})")
        by_module.setdefault(match["module"], {})[match["side"]] = old
    linears = layout.linears[component]
    out: dict[str, torch.Tensor] = {}
    for module, sides in sorted(by_module.items()):
        out.update(_lora_pair(fname, module, sides, sd, linears.get(module)))
    return out


def _ranks(peft_sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(v.shape[0]) for k, v in peft_sd.items() if k.endswith(".lora_A.weight")})


# -- prefix ----------------------------------------------------------------------------------------
def convert_prefix_file(sd: Mapping[str, torch.Tensor], layout: TargetLayout, fname: str) -> torch.Tensor:
    """Their K soft tokens ([K, hidden]): rows 1..K of `token_embedding.weight` (row 0 must be the zero row)."""
    unknown = sorted(set(sd) - {PREFIX_TOKENS_KEY, *PREFIX_IGNORED_KEYS})
    if unknown:
        raise ShenImportError(f"{fname}: unknown key {unknown[0]!r}; expected {PREFIX_TOKENS_KEY!r} and position_* copies")
    if PREFIX_TOKENS_KEY not in sd:
        raise ShenImportError(f"{fname}: lacks {PREFIX_TOKENS_KEY!r}")
    table = _weight(fname, PREFIX_TOKENS_KEY, sd[PREFIX_TOKENS_KEY])
    rows, width = table.shape
    if width != layout.hidden_size:
        raise ShenImportError(f"{fname}: {PREFIX_TOKENS_KEY}: width {width}, the text encoder's is {layout.hidden_size}")
    if rows < 2 or rows - 1 > layout.max_positions - 2:
        raise ShenImportError(
            f"{fname}: {PREFIX_TOKENS_KEY}: {rows} rows; expected 1 + K with 1 <= K <= {layout.max_positions - 2}"
        )
    if torch.count_nonzero(table[0]) != 0:
        raise ShenImportError(f"{fname}: {PREFIX_TOKENS_KEY}: row 0 is not zero, so this is not their [0; tokens] layout")
    _check_position_copy(sd, layout, fname)
    return table[1:].clone()


def _check_position_copy(sd: Mapping[str, torch.Tensor], layout: TargetLayout, fname: str) -> None:
    """The ignored position embedding copy must at least have the target's shape (else: another base model)."""
    key = "position_embedding.weight"
    if key in sd:
        table = _weight(fname, key, sd[key])
        if tuple(table.shape) != (layout.max_positions, layout.hidden_size):
            raise ShenImportError(
                f"{fname}: {key}: shape {list(table.shape)}, the base model's is [{layout.max_positions}, {layout.hidden_size}]"
            )


# -- adaptors --------------------------------------------------------------------------------------
def find_checkpoint_files(folder: Path) -> dict[str, Path]:
    """Which of their three files the folder holds (file name -> path); none is an error."""
    if not folder.is_dir():
        raise ShenImportError(f"{str(folder)!r} is not a folder")
    found = {name: folder / name for name in SHEN_FILES if (folder / name).is_file()}
    if not found:
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise ShenImportError(f"{str(folder)!r} holds none of {list(SHEN_FILES)} (found: {present or 'nothing'})")
    return found


def default_id_prefix(folder: Path) -> str:
    """`shen-<run>-ckpt<K>` from `.../from-paper_<run>/checkpoint-<K>_exported`, short enough for a suffix."""
    run = folder.resolve().parent.name.removeprefix("from-paper_")
    checkpoint = folder.resolve().name.removesuffix("_exported").replace("checkpoint-", "ckpt")
    slug = re.sub(r"[^a-z0-9_-]+", "-", f"shen-{run}-{checkpoint}".lower())
    return slug[:56].strip("-_")


def _experiment(folder: Path) -> str | None:
    """`exp-N-...` for their `exp-N-.../outputs/<run>/<checkpoint>` layout, else None."""
    folder = folder.resolve()
    return folder.parents[2].name if len(folder.parents) > 2 and folder.parents[1].name == "outputs" else None


def _source(folder: Path) -> str:
    """Experiment, run and checkpoint folder names: enough to find the download, without local paths."""
    folder = folder.resolve()
    experiment = _experiment(folder)
    return "/".join(([experiment, "outputs"] if experiment else []) + [folder.parent.name, folder.name])


def _warn_default_target(folder: Path) -> None:
    """Only their exp-1 and exp-2 debias gender alone; the others need --target (their classes, e.g. race)."""
    experiment = _experiment(folder)
    if experiment and not re.match(r"exp-[12]-", experiment):
        logger.warning(
            "%s was not trained for the default target %s (only exp-1/exp-2 debias gender alone): pass --target",
            experiment,
            DEFAULT_TARGET,
        )


@dataclass
class _Part:
    """One adaptor to make from the folder, before it has an id and a name."""

    suffix: str
    cls: type[Adaptor]
    tensors: dict[str, torch.Tensor]
    hyperparameters: dict[str, Any]
    source_files: list[str]
    label: str


def _lora_part(loaded: Mapping[str, dict[str, torch.Tensor]], layout: TargetLayout) -> _Part | None:
    """Both LoRA files (when present) as one adaptor: text encoder and UNet were trained together."""
    files = {c: f for c, f in (("text_encoder", TEXT_ENCODER_FILE), ("unet", UNET_FILE)) if f in loaded}
    if not files:
        return None
    peft = {c: convert_lora_file(loaded[f], c, layout, f) for c, f in files.items()}
    tensors = {k: v for c, sd in peft.items() for k, v in to_file_layout(c, sd).items()}
    ranks = sorted({r for sd in peft.values() for r in _ranks(sd)})
    hp = {"components": sorted(peft), "rank": ranks, "lora_scale": 1.0}
    label = "LoRA: " + " + ".join({"text_encoder": "text encoder", "unet": "UNet"}[c] for c in sorted(peft))
    return _Part("lora", LoraAdaptor, tensors, hp, sorted(files.values()), label)


def _prefix_part(loaded: Mapping[str, dict[str, torch.Tensor]], layout: TargetLayout) -> _Part | None:
    if PREFIX_FILE not in loaded:
        return None
    tokens = convert_prefix_file(loaded[PREFIX_FILE], layout, PREFIX_FILE)
    hp = {"num_tokens": int(tokens.shape[0]), "position": "after_bos"}
    return _Part("prefix", PrefixAdaptor, {PREFIX_KEY: tokens}, hp, [PREFIX_FILE], "prefix tokens")


def _provenance(folder: Path, digests: Mapping[str, str], files: list[str]) -> dict[str, Any]:
    return {
        "imported_from": IMPORTED_FROM,
        "paper": PAPER,
        "repository": REPOSITORY,
        "source": _source(folder),
        "source_files": {f: digests[f] for f in files},
    }


def _adaptor_id(prefix: str, part: _Part) -> str:
    adaptor_id = f"{prefix}-{part.suffix}"
    if not valid_adaptor_id(adaptor_id):
        raise ShenImportError(f"adaptor id {adaptor_id!r} is invalid: use lower-case letters, digits, '_' and '-' (at most 64)")
    return adaptor_id


def convert_checkpoint_folder(
    folder: str | Path,
    layout: TargetLayout,
    base_model: str,
    id_prefix: str | None = None,
    target: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> list[Adaptor]:
    """Their export folder as at most two adaptors (`<prefix>-lora`, `<prefix>-prefix`), in memory only.

    `target` is what the checkpoint was trained for (their exp-1/2 checkpoints: gender 50/50, the
    default); the manifests also carry their sampler and each source file's sha256.
    """
    folder = Path(folder)
    files = find_checkpoint_files(folder)
    if target is None:
        _warn_default_target(folder)
    checked_target = validate_target(target if target is not None else DEFAULT_TARGET, None, field="target")
    prefix = id_prefix if id_prefix is not None else default_id_prefix(folder)
    read = {fname: read_checkpoint(path) for fname, path in files.items()}
    loaded = {fname: sd for fname, (sd, _) in read.items()}
    digests = {fname: hashlib.sha256(data).hexdigest() for fname, (_, data) in read.items()}
    parts = [p for p in (_lora_part(loaded, layout), _prefix_part(loaded, layout)) if p is not None]
    adaptors: list[Adaptor] = []
    for part in parts:
        title = f"Shen et al. 2024 {_source(folder)} ({part.label})"
        if name:
            title = f"{name} ({part.label})" if len(parts) > 1 else name
        manifest = AdaptorManifest(
            id=_adaptor_id(prefix, part),
            kind=part.cls.kind,
            base_model=base_model,
            attributes=list(checked_target),
            target=checked_target,
            hyperparameters=part.hyperparameters,
            sampler=dict(SHEN_SAMPLER),
            name=title,
            provenance=_provenance(folder, digests, part.source_files),
        )
        adaptors.append(part.cls(manifest, part.tensors))
    return adaptors


def publish_adaptors(store: AdaptorStore, adaptors: list[Adaptor]) -> list[AdaptorManifest]:
    """Publish all or none: ids are checked free first, and a failure retires what this call published."""
    taken = [a.id for a in adaptors if store.exists(a.id)]
    if taken:
        raise FileExistsError(f"adaptor(s) {taken} already exist in {str(store.root)!r}; pass another --id")
    published: list[AdaptorManifest] = []
    try:
        for adaptor in adaptors:
            staging = store.staging_dir(adaptor.id)
            try:
                adaptor.save(staging)
                published.append(store.publish(staging))
            finally:
                store.discard(staging)  # gone after a successful publish (renamed): a no-op then
    except BaseException:
        for manifest in published:
            store.retire(manifest.id)
        raise
    return published


def import_checkpoint_folder(
    folder: str | Path, store: AdaptorStore, layout: TargetLayout, base_model: str, **options: Any
) -> list[AdaptorManifest]:
    """Convert their export folder and publish the result (see `convert_checkpoint_folder` for options)."""
    adaptors = convert_checkpoint_folder(folder, layout, base_model, **options)
    manifests = publish_adaptors(store, adaptors)
    for m in manifests:
        logger.info("imported %s (%s) from %s", m.id, m.kind, ", ".join(m.provenance["source_files"]))
    return manifests
