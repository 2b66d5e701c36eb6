"""`gptoss-convert golden`: reference logits from HF transformers, in MaxText's golden-file format.

One JSON line per prompt: {"prompt": str, "tokens": [int], "logits": [[float]]} with fp32 logits
for every position — the format MaxText's logit checker reads, so files move both ways.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptoss_convert.errors import InputError
from gptoss_convert.io.files import temp_path
from gptoss_convert.verify.prompts import DEFAULT_PROMPTS, LONG_PASSAGE

_TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_prompts(prompts: str | None = None, prompts_file: str | os.PathLike | None = None,
                  include_long: bool = True) -> list[str]:
    """';'-separated prompts, or one prompt per line of a file; default: MaxText's three + a long passage."""
    if prompts_file is not None:
        try:
            items = [ln for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{prompts_file}: cannot read prompts ({e})") from None
    elif prompts is not None:
        items = [p for p in (s.strip() for s in prompts.split(";")) if p]
    else:
        items = list(DEFAULT_PROMPTS) + ([LONG_PASSAGE] if include_long else [])
    if not items:
        raise InputError("no prompts given")
    return items


def load_hf_model(hf_dir: str | os.PathLike, dtype: str = "float32"):
    """GptOssForCausalLM from an MXFP4 (dequantized on load) or BF16 directory, eager attention.

    The dtype is given to from_pretrained (never `.to(bfloat16)`, which would also cast the fp32
    rotary inv_freq buffer; docs/forward.md §4).
    """
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()           # no load-progress bars or CPU-MXFP4 notices
    hf_logging.disable_progress_bar()
    d = Path(hf_dir)
    conf = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    kw = {}
    if (conf.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    # eager attention and experts: the plain reference code paths (transformers 5 defaults the
    # experts to grouped_mm)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, _TORCH_DTYPES[dtype]),
                                                 attn_implementation="eager", experts_implementation="eager", **kw)
    return model.eval()


def hf_logits(model, tokens: list[int]):
    """fp32 numpy logits [T, V] for one unpadded sequence."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long)).logits[0]
    return out.float().numpy()


def golden(hf_dir: str | os.PathLike, out: str | os.PathLike, *, prompts: str | None = None,
           prompts_file: str | os.PathLike | None = None, dtype: str = "float32", log=print) -> Path:
    """Run HF transformers on `hf_dir` and write one golden JSON line per prompt to `out`."""
    from gptoss_convert.io.hf_checkpoint import resolve_source
    from transformers import AutoTokenizer

    d = resolve_source(hf_dir)
    if dtype not in _TORCH_DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use float32 or bfloat16")
    items = parse_prompts(prompts, prompts_file)
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise InputError(f"{d}: no usable tokenizer ({' '.join(str(e).split())[:200]})") from None
    model = load_hf_model(d, dtype)
    out = Path(out)
    tmp = temp_path(out)
    with open(tmp, "w") as f:
        for p in items:
            tokens = tok(p)["input_ids"]
            logits = hf_logits(model, tokens)
            f.write(json.dumps({"prompt": p, "tokens": [int(t) for t in tokens], "logits": logits.tolist()}) + "\n")
    os.replace(tmp, out)
    log(f"golden: {len(items)} prompt(s), {dtype} logits from transformers -> {out}")
    return out


def read_golden(path: str | os.PathLike, vocab_size: int | None = None) -> list[dict]:
    """Read and validate a golden file; every problem names the line."""
    import numpy as np

    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read golden file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            tokens = rec["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise TypeError("tokens must be a list of integers")
            logits = np.asarray(rec["logits"], dtype=np.float32)
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
            msg = " ".join(str(e).split())[:120]
            raise InputError(f"{path}:{n}: not a golden record with integer tokens and logits ({type(e).__name__}: {msg})") from None
        if not tokens or logits.ndim != 2 or logits.shape[0] != len(tokens):
            raise InputError(f"{path}:{n}: logits shape {list(logits.shape)} does not match {len(tokens)} tokens")
        if vocab_size is not None and (logits.shape[1] != vocab_size or max(tokens) >= vocab_size or min(tokens) < 0):
            raise InputError(f"{path}:{n}: golden vocab {logits.shape[1]} / token ids up to {max(tokens)} do not fit the model's vocab_size {vocab_size}")
        if not np.isfinite(logits).all():
            raise InputError(f"{path}:{n}: logits contain NaN or inf")
        records.append({"prompt": rec.get("prompt", ""), "tokens": tokens, "logits": logits})
    if not records:
        raise InputError(f"{path}: no golden records")
    return records
