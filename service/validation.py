"""Checks that need the base model's published `ModelInfo`: size, attributes and prompt length.

The gateway has no torch and never loads the model: inference workers publish what it needs to
validate (attribute classes, image size, the tokenizer as JSON) into the job store, and the
prompt's token count comes from the `tokenizers` library reading that JSON.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from common.adaptor_manifest import AdaptorManifest, AdaptorNotFound, read_manifest, valid_adaptor_id
from common.jobs import JobStore
from common.schemas import ModelInfo
from service.errors import Conflict, InvalidField, NotFound, ServiceUnavailable

logger = logging.getLogger(__name__)


def require_model_info(store: JobStore, base_model: str) -> ModelInfo:
    info = store.model_info(base_model)
    if info is None:
        raise ServiceUnavailable(
            f"no inference worker has registered base model {base_model!r} yet; retry once a worker is up",
            code="no_worker",
        )
    return info


@lru_cache(maxsize=8)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer_json)
    # Count the real length: a saved tokenizer may pad or truncate to the model's limit.
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_count(info: ModelInfo, text: str) -> int | None:
    """Tokens including the begin/end markers the text encoder sees; None without a tokenizer."""
    if not info.tokenizer_json:
        return None
    return len(_tokenizer(info.tokenizer_json).encode(text).ids)


def check_prompt(info: ModelInfo, text: str, field: str) -> None:
    n = token_count(info, text)
    if n is not None and n > info.max_tokens:
        raise InvalidField(
            f"{field}: {n} tokens, but base model {info.base_model!r} takes at most {info.max_tokens}",
            param=field,
            code="prompt_too_long",
        )


def load_manifest(adaptor_root: Path, adaptor_id: str, param: str) -> AdaptorManifest:
    """An adaptor's manifest, or 404 naming `param` (unknown or malformed id), or 409 when unreadable."""
    if not valid_adaptor_id(adaptor_id):
        raise NotFound(f"{param}: no adaptor {adaptor_id!r} in the store", param=param, code="adaptor_not_found")
    try:
        return read_manifest(adaptor_root, adaptor_id)
    except AdaptorNotFound as exc:
        raise NotFound(f"{param}: no adaptor {adaptor_id!r} in the store", param=param, code="adaptor_not_found") from exc
    except ValueError as exc:
        logger.warning("adaptor %s has an unreadable manifest: %s", adaptor_id, exc)
        raise Conflict(
            f"{param}: adaptor {adaptor_id!r} has an unreadable manifest", param=param, code="adaptor_unreadable"
        ) from exc
