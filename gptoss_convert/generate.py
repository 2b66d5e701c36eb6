"""`gptoss-convert generate`: load a converted checkpoint, tokenize a prompt, decode with the family's KV cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from gptoss_convert.errors import InputError
from gptoss_convert.io.files import MAX_SIDECAR_BYTES, MAX_TOKENIZER_BYTES, check_size, read_json_object
from gptoss_convert.loading import load_config, load_params, locate
from gptoss_convert.tree import unflatten


def _eos_ids(config_dir: Path) -> list[int] | None:
    """eos ids from generation_config.json (gpt-oss lists several), else config.json."""
    for name in ("generation_config.json", "config.json"):
        f = config_dir / name
        if f.is_file():
            eos = read_json_object(f, name, MAX_SIDECAR_BYTES).get("eos_token_id")   # size-limited, an object
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else eos
                if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise InputError(f"{f}: eos_token_id {eos!r} is not a token id or a list of them")
                return ids
    return None


def _tokenizer(tokenizer_dir: Path):
    from tokenizers import Tokenizer
    f = tokenizer_dir / "tokenizer.json"
    if not f.is_file():
        raise InputError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer HF_DIR (the source model directory)")
    check_size(f, MAX_TOKENIZER_BYTES, "tokenizer.json")          # read whole by the tokenizer library
    return Tokenizer.from_file(str(f))


def generate_from_checkpoint(ckpt: str | os.PathLike, prompt: str, *, tokenizer: str | os.PathLike | None = None,
                             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                             moe: str = "ragged_dot", dtype="float32", step: int | None = None,
                             item: str | None = None) -> dict:
    """Load CKPT (OUT, OUT/0, OUT/0/items of to-orbax, or an HF directory), tokenize `prompt` with the
    tokenizer beside it (or `tokenizer`), and continue it. Returns prompt/text/ids/stats."""
    like = tokenizer if tokenizer and (Path(tokenizer) / "config.json").is_file() else None
    ck = locate(ckpt, like, step=step, item=item)
    backend, cfg = load_config(ck)
    tok = _tokenizer(Path(tokenizer) if tokenizer else ck.config_dir)
    prompt_ids = tok.encode(prompt).ids
    if not prompt_ids:
        raise InputError("the prompt encodes to no tokens; give a non-empty --prompt")
    dtype = jnp.dtype(dtype)
    flat, _ = load_params(ck, dtype=dtype)      # Orbax leaves are cast while read; HF dirs come as fp32
    params = unflatten({k: jnp.asarray(v, dtype) for k, v in flat.items()})
    [new], stats = backend.generate(params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, moe=moe, dtype=dtype, eos_id=_eos_ids(ck.config_dir))
    return {"prompt": prompt, "text": tok.decode(new, skip_special_tokens=False), "prompt_ids": prompt_ids,
            "new_ids": new, "stats": stats}
