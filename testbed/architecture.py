"""The testbed's model: a tiny Stable Diffusion (same classes, same pipeline) and its tokenizer.

Nothing is downloaded: the tokenizer vocabulary is generated from the world's words, and
every component is built from a config, so that the trained result loads with plain
`StableDiffusionPipeline.from_pretrained(path)` exactly like SD v1.5 does.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from testbed.renderer import IMAGE_SIZE
from testbed.world import vocabulary_words

MAX_TOKENS = 32
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table CLIP's byte-level BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair until none is known, as byte-level BPE does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), -1), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        known = [(r, i) for r, i in pairs if r >= 0]
        if not known:
            break
        _, i = min(known)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_tokenizer(extra_words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges turn each world word into one token.

    Unknown words still tokenize (they fall back to single characters), so any prompt works;
    the world's words simply cost one token each. `extra_words` come last, so every other
    word tokenizes as in the main model's vocabulary.
    """
    chars = list(_bytes_to_unicode().values())
    vocab_list: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = vocabulary_words()
    for word in [*words, *(w for w in extra_words if w not in words)]:
        # Run BPE with the merges so far and append merges until the word is one symbol. New
        # merges rank after all earlier ones, so words already single tokens stay that way.
        symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            symbols = _apply_bpe(symbols, ranks)
    vocab_list += list(_SPECIAL)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_TOKENS,
        bos_token=_SPECIAL[0],
        eos_token=_SPECIAL[1],
        pad_token=_SPECIAL[1],
        unk_token=_SPECIAL[1],
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    eos = tokenizer.convert_tokens_to_ids(_SPECIAL[1])
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.convert_tokens_to_ids(_SPECIAL[0]),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **_BETAS)


def build_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **_BETAS)
