"""`gptoss-convert golden`: reference logits from HF transformers, in MaxText's golden-file format.

One JSON line per prompt: {"prompt": str, "tokens": [int], "logits": [[float]]} with fp32 logits
for every position — the format MaxText's logit checker reads, so files move both ways.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from gptoss_convert.errors import InputError, OutputError
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


def resolve_dtype(dtype: str) -> str:
    """'fp32'/'float32' -> 'float32', 'bf16'/'bfloat16' -> 'bfloat16'; anything else is refused."""
    try:
        return _TORCH_DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported; use fp32 (float32) or bf16 (bfloat16)") from None


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output path that cannot be written (missing or read-only
    folder, a directory in its place)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"{p}: is a directory; give a file path for the {what}")
    if not parent.is_dir():
        raise OutputError(f"{p}: folder {parent} does not exist; create it or choose another path for the {what}")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"{p}: not writable; choose a writable path for the {what}")
    return p


def read_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> list[list[int]]:
    """A `--tokens` file: a JSON list of non-empty token-id lists, ids in [0, vocab_size)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: cannot read token ids ({' '.join(str(e).split())[:120]})") from None
    ok = isinstance(data, list) and data and all(
        isinstance(t, list) and t and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in t)
        for t in data)
    if not ok:
        raise InputError(f"{path}: not a JSON list of non-empty lists of token ids (e.g. [[1, 2, 3], [4, 5]])")
    top = max(max(t) for t in data)
    if vocab_size is not None and top >= vocab_size:
        raise InputError(f"{path}: token id {top} does not fit the model's vocab_size {vocab_size}")
    return data


def prompt_tokens(d: Path, prompts: str | None = None, prompts_file=None, tokens=None,
                  vocab_size: int | None = None) -> list[tuple[str, list[int]]]:
    """(label, token ids) per prompt: from a `--tokens` file, else the prompts tokenized by the
    checkpoint's tokenizer. A directory without a usable tokenizer is refused, naming --tokens."""
    if tokens is not None:
        if prompts is not None or prompts_file is not None:
            raise InputError("give --tokens or prompts (--prompts, --prompts-file), not both")
        return [(f"tokens[{i}]", t) for i, t in enumerate(read_tokens(tokens, vocab_size))]
    items = parse_prompts(prompts, prompts_file)
    hint = "give the token ids with --tokens FILE (a JSON list of token-id lists)"
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(d)
        ids = [list(tok(p)["input_ids"]) for p in items]
    except Exception as e:          # transformers raises many kinds on tokenizer-less folders
        raise InputError(f"{d}: no usable tokenizer ({' '.join(str(e).split())[:160]}); {hint}") from None
    empty = [p for p, t in zip(items, ids) if not t]
    if empty:
        raise InputError(f"{d}: the tokenizer gave no token ids for {empty[0][:40]!r} (no tokenizer files?); {hint}")
    return list(zip(items, ids))


def model_bytes(d: Path, dtype: str) -> int:
    """The model's size once loaded in `dtype` (MXFP4 blocks count two values a byte), from the
    safetensors headers."""
    from gptoss_convert.verify.hf_streamed import SafetensorsFiles
    files = SafetensorsFiles(d)
    n = 0
    for name in files.where:
        if name.endswith("_scales"):
            continue
        numel = math.prod(files.shape(name))
        n += 2 * numel if name.endswith("_blocks") else numel
    return n * (4 if dtype == "float32" else 2)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (physical memory where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def want_streamed(d: Path, dtype: str) -> bool:
    """The streamed golden by default when the loaded model would take over half the available memory."""
    return model_bytes(d, dtype) > available_bytes() // 2


def coverage(hit: list[list[int]], n_experts: int, source: str) -> dict:
    """Experts routed at least once, per layer: the report's coverage section and its one line."""
    per = [len(h) for h in hit]
    total, got = n_experts * len(hit), sum(per)
    missing = {i: sorted(set(range(n_experts)) - set(h)) for i, h in enumerate(hit) if len(h) < n_experts}
    line = f"expert coverage ({source}): {got}/{total} experts routed ({100 * got / max(total, 1):.0f}%)"
    line += ", every expert of every layer" if not missing else f"; {len(missing)} layer(s) miss experts: " + \
        "; ".join(f"layer {i}: {m[:8]}{'...' if len(m) > 8 else ''}" for i, m in list(missing.items())[:4])
    return {"source": source, "experts": n_experts, "per_layer": per, "hit": got, "total": total,
            "missing": {str(k): v for k, v in missing.items()}, "summary": line}


def golden_records(d: Path, items: list[tuple[str, list[int]]], dtype: str = "float32", *, streamed: bool | None = None,
                   show_progress: bool = True) -> tuple[list[dict], dict]:
    """transformers' logits for each (label, tokens): the whole model, or layer by layer
    (`streamed`; None = when the model would not fit in half the available memory). Returns
    the records and the experts coverage of transformers' router."""
    from gptoss_convert.verify import hf_streamed

    streamed = want_streamed(d, dtype) if streamed is None else streamed
    toks = [t for _, t in items]
    if streamed:
        logits, hit = hf_streamed.streamed_logits(d, toks, dtype, show_progress=show_progress)
    else:
        logits, hit = _whole_model_logits(d, toks, dtype, show_progress)
    conf = json.loads((d / "config.json").read_text())
    n_experts = conf.get("num_local_experts") or conf.get("num_experts") or 0
    recs = [{"prompt": p, "tokens": [int(x) for x in t], "logits": lg} for (p, t), lg in zip(items, logits)]
    return recs, coverage(hit, n_experts, "transformers router, streamed" if streamed else "transformers router")


def _whole_model_logits(d: Path, token_lists, dtype: str, show_progress: bool):
    """The whole model loaded once, one unpadded sequence per prompt; routed experts recorded."""
    from gptoss_convert.progress import progress, step
    from gptoss_convert.verify.hf_streamed import Coverage

    with step(f"golden: loading the whole model in {dtype} (transformers)", show_progress):
        model = load_hf_model(d, dtype)
    layers = model.model.layers
    cov = Coverage(len(layers))
    hooks = [layer.mlp.experts.register_forward_pre_hook(cov.hook(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    out = []
    with progress(len(token_lists), "golden: transformers, whole model", show_progress, unit="it") as bar:
        for t in token_lists:
            out.append(hf_logits(model, t))
            bar.update(1)
    for h in hooks:
        h.remove()
    return out, [sorted(s) for s in cov.hit]


def write_records(out: Path, records: list[dict]) -> None:
    """The golden file, one JSON line per record, written a logits row at a time (a 201k-entry
    vocabulary makes a whole record's Python list several GB); same text as json.dumps(record)."""
    tmp = temp_path(out)
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "tokens": r["tokens"]})[:-1] + ', "logits": [')
            f.write(", ".join(json.dumps(row.tolist()) for row in r["logits"]) + "]}\n")
    os.replace(tmp, out)


def golden(hf_dir: str | os.PathLike, out: str | os.PathLike, *, prompts: str | None = None,
           prompts_file: str | os.PathLike | None = None, tokens: str | os.PathLike | None = None,
           dtype: str = "float32", streamed: bool | None = None, show_progress: bool = True, log=print) -> Path:
    """Run HF transformers on `hf_dir` and write one golden JSON line per prompt to `out`.

    `tokens`: a JSON file of token-id lists instead of prompts (no tokenizer needed). `streamed`:
    transformers' layers one at a time (hf_streamed), bounded memory; None = when the model would
    take over half the available memory. `out` is checked writable before any work."""
    from gptoss_convert.io.hf_checkpoint import resolve_source

    dtype = resolve_dtype(dtype)
    out = check_writable(out, "golden file")
    d = Path(resolve_source(hf_dir))
    items = prompt_tokens(d, prompts, prompts_file, tokens, _vocab_size(d))
    records, cov = golden_records(d, items, dtype, streamed=streamed, show_progress=show_progress)
    write_records(out, records)
    log(cov["summary"])
    log(f"golden: {len(items)} prompt(s), {dtype} logits from transformers -> {out}")
    return out


def _vocab_size(d: Path) -> int | None:
    try:
        return json.loads((d / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None


def read_golden(path: str | os.PathLike, vocab_size: int | None = None) -> list[dict]:
    """Read and validate a golden file; every problem names the line. Read a line (one prompt's
    record) at a time: the JSON text of a full-vocabulary file is several times its float32
    logits, and only one record's text and parse are held at once."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    records.append(_golden_record(path, n, line, vocab_size))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read golden file ({e})") from None
    if not records:
        raise InputError(f"{path}: no golden records")
    return records


def _golden_record(path, n: int, line: str, vocab_size: int | None) -> dict:
    """Line `n` of the golden file `path`, validated."""
    import numpy as np

    try:
        rec = json.loads(line)
        tokens = rec["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise TypeError("tokens must be a list of integers")
        logits = np.asarray(rec["logits"], dtype=np.float32)
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
        msg = " ".join(str(e).split())[:120]
        raise InputError(f"{path}:{n}: not a golden record with integer tokens and logits "
                         f"({type(e).__name__}: {msg})") from None
    if not tokens or logits.ndim != 2 or logits.shape[0] != len(tokens):
        raise InputError(f"{path}:{n}: logits shape {list(logits.shape)} does not match {len(tokens)} tokens")
    if vocab_size is not None and (logits.shape[1] != vocab_size or max(tokens) >= vocab_size or min(tokens) < 0):
        raise InputError(f"{path}:{n}: golden vocab {logits.shape[1]} / token ids up to {max(tokens)} do not fit "
                         f"the model's vocab_size {vocab_size}")
    if not np.isfinite(logits).all():
        raise InputError(f"{path}:{n}: logits contain NaN or inf")
    return {"prompt": rec.get("prompt", ""), "tokens": tokens, "logits": logits}
