"""Generate small random gpt-oss checkpoints in the published layout (MXFP4 or BF16).

The config is the published gpt-oss-20b config.json with only the sizes changed, and the
directory is laid out as the published repositories are (see `write_checkpoint`).

Every dimension is distinct so a transposed matrix cannot hide behind a square shape. Expert
weights are drawn as random MXFP4 codes, so the BF16 form of a checkpoint is exactly the
dequantized MXFP4 form and both must convert to identical outputs. `write_sparse_checkpoint`
lays out the same tensors at real sizes as sparse files, for plans at full size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import mxfp4
from gptoss_convert.backends.gpt_oss.config import FULL, SLIDING, GptOssConfig, config_from_dict
from gptoss_convert.io.safetensors import DTYPES, build_header, save_file
from gptoss_convert.testing.published import published_config

BF16 = ml_dtypes.bfloat16
# H 64, I 96, E 5, k 3, Nq 4, D 8, Nkv 2, L 6, window 5, V 300 (docs/maxtext.md §3 orientation trap).
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_local_experts=5, num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=5)
SIZE_FIELDS = tuple(TINY)
# Token ids must index the tiny vocabulary (the published ones are 199999/200002).
TINY_TOKENS = {"eos_token_id": 2, "pad_token_id": 0}


def tiny_raw_config(**sizes) -> dict:
    """The published gpt-oss-20b config.json with only the sizes changed (TINY, then `sizes`),
    and the token ids, which must fit the vocabulary; every other field stays as published."""
    if unknown := set(sizes) - set(SIZE_FIELDS):
        raise ValueError(f"tiny configs change sizes only ({', '.join(SIZE_FIELDS)}), not {sorted(unknown)}")
    raw = published_config("gpt-oss-20b") | TINY | sizes | TINY_TOKENS
    raw["experts_per_token"] = raw["num_experts_per_tok"]                  # both spellings, as published
    raw["layer_types"] = [SLIDING if i % 2 == 0 else FULL for i in range(raw["num_hidden_layers"])]
    return raw


def tiny_config(**sizes) -> GptOssConfig:
    """A tiny gpt-oss config: the published 20b one with distinct small sizes."""
    return config_from_dict(tiny_raw_config(**sizes), "tiny config")


def config_json(cfg: GptOssConfig) -> dict:
    """The config.json of a checkpoint of `cfg`: the published one with cfg's sizes."""
    raw = tiny_raw_config(**{k: getattr(cfg, k) for k in SIZE_FIELDS})
    if config_from_dict(raw) != cfg:
        raise ValueError("write_checkpoint writes the published config with cfg's sizes; "
                         "cfg differs in more than sizes")
    return raw


def _normal(mean: float, std: float):
    return lambda rng, shape: (mean + std * rng.standard_normal(shape)).astype(np.float32).astype(BF16)


def _codes(scale_lo: int, scale_hi: int):
    """Random MXFP4 blocks (any byte) or scales (in [scale_lo, scale_hi]) for a `_blocks`/`_scales` spec."""
    def draw(rng, shape):
        lo, hi = (0, 255) if len(shape) == 4 else (scale_lo, scale_hi)
        return rng.integers(lo, hi + 1, shape, dtype=np.uint8)
    return draw


def hf_specs(cfg: GptOssConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor of the published MXFP4 layout."""
    return {n: (shape, dtype) for n, (shape, dtype, _) in _layout(cfg, (0, 0)).items()}


def _layout(cfg: GptOssConfig, expert_scale) -> dict[str, tuple[tuple[int, ...], str, object]]:
    """name -> (shape, dtype, draw(rng, shape)); the order is the order values are drawn in."""
    H, F, E, V, Nq, Nkv, D = cfg.H, cfg.I, cfg.E, cfg.V, cfg.Nq, cfg.Nkv, cfg.D
    bf = lambda *shape, mean=0.0, std=0.05: (shape, "BF16", _normal(mean, std))  # noqa: E731
    u8 = lambda *shape: (shape, "U8", _codes(*expert_scale))  # noqa: E731
    t = {"model.embed_tokens.weight": bf(V, H, std=1.0), "model.norm.weight": bf(H, mean=1.0, std=0.1),
         "lm_head.weight": bf(V, H, std=0.1)}
    for i in range(cfg.L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": bf(H, mean=1.0, std=0.1),
              p + "post_attention_layernorm.weight": bf(H, mean=1.0, std=0.1),
              p + "self_attn.q_proj.weight": bf(Nq * D, H, std=0.15), p + "self_attn.q_proj.bias": bf(Nq * D),
              p + "self_attn.k_proj.weight": bf(Nkv * D, H, std=0.15), p + "self_attn.k_proj.bias": bf(Nkv * D),
              p + "self_attn.v_proj.weight": bf(Nkv * D, H, std=0.15), p + "self_attn.v_proj.bias": bf(Nkv * D),
              p + "self_attn.o_proj.weight": bf(H, Nq * D, std=0.1), p + "self_attn.o_proj.bias": bf(H),
              p + "self_attn.sinks": bf(Nq, std=1.0),
              p + "mlp.router.weight": bf(E, H, std=0.3), p + "mlp.router.bias": bf(E, std=0.1),
              p + "mlp.experts.gate_up_proj_bias": bf(E, 2 * F), p + "mlp.experts.down_proj_bias": bf(E, H),
              # stored [E, out, in/32, 16] + [E, out, in/32]: gate_up out=2I in=H, down out=H in=I
              p + "mlp.experts.gate_up_proj_blocks": u8(E, 2 * F, H // 32, 16),
              p + "mlp.experts.gate_up_proj_scales": u8(E, 2 * F, H // 32),
              p + "mlp.experts.down_proj_blocks": u8(E, H, F // 32, 16),
              p + "mlp.experts.down_proj_scales": u8(E, H, F // 32)}
    return t


def hf_tensors(cfg: GptOssConfig, seed: int = 0, *, expert_scale=(119, 122)) -> dict[str, np.ndarray]:
    """Random tensors in the published layout: dense ones BF16, expert matrices as MXFP4 pairs."""
    rng = np.random.default_rng(seed)
    return {name: draw(rng, shape) for name, (shape, _, draw) in _layout(cfg, expert_scale).items()}


def dequantized(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BF16 form of `hf_tensors` output: pairs replaced by X [E, in, out] (HF orientation)."""
    out = {}
    for name, arr in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name[:-len("_blocks")]
            deq = mxfp4.dequantize(arr, tensors[base + "_scales"], BF16, name=base)
            out[base] = np.ascontiguousarray(np.swapaxes(deq, -1, -2))
        else:
            out[name] = arr
    return out


def shard_names(n: int) -> list[str]:
    """Shard file names as the published repositories number them: from zero, `-of-` the last index."""
    return ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n - 1:05d}.safetensors" for k in range(n)]


def split_evenly(sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Names (in order) cut into at most `shards` consecutive groups of about equal bytes."""
    total, groups, acc = sum(sizes.values()), [[]], 0
    for name, size in sizes.items():
        if groups[-1] and acc >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        acc += size
    return groups


def _write_shards(out: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    groups = split_evenly({n: a.nbytes for n, a in tensors.items()}, shards)
    names = shard_names(len(groups))
    for fname, group in zip(names, groups):
        save_file({n: tensors[n] for n in group}, out / fname, {"format": "pt"})
    if len(groups) > 1:
        weight_map = {n: f for f, g in zip(names, groups) for n in g}
        total = sum(a.nbytes for a in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


CHAT_TEMPLATE = "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"


def write_decoys(out: Path) -> None:
    """`original/` and `metal/` as the published repositories have them: never to be read."""
    (out / "original").mkdir(exist_ok=True)
    (out / "original" / "model.safetensors").write_bytes(b"not the HF layout: a converter must never read this")
    (out / "original" / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    (out / "metal").mkdir(exist_ok=True)
    (out / "metal" / "model.bin").write_bytes(b"\0" * 64)


def write_checkpoint(out_dir: str | Path, cfg: GptOssConfig | None = None, *, fmt: str = "mxfp4",
                     seed: int = 0, shards: int = 3, tokenizer: bool = True,
                     config_updates: dict | None = None) -> Path:
    """Write a random gpt-oss checkpoint directory laid out like the published repositories
    (shards numbered from zero, index, `original/` and `metal/` decoys, generation config, chat
    template, tokenizer); config.json is the published one with cfg's sizes. fmt="bf16" writes a
    BF16 re-upload (experts dequantized, no quantization_config). `config_updates` are applied
    last (None values remove a field). Returns the path."""
    cfg = cfg or tiny_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(cfg, seed)
    conf = config_json(cfg)
    if fmt == "bf16":
        tensors = dequantized(tensors)
        del conf["quantization_config"]
        conf["torch_dtype"] = "bfloat16"
    elif fmt != "mxfp4":
        raise ValueError(f"fmt: expected 'mxfp4' or 'bf16', got {fmt!r}")
    for k, v in (config_updates or {}).items():
        conf.pop(k) if v is None else conf.__setitem__(k, v)
    _write_shards(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1}))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_decoys(out)
    if tokenizer:
        from gptoss_convert.testing.tokenizer import write_tokenizer
        write_tokenizer(out, cfg.V)
    return out


def write_sparse_checkpoint(out_dir: str | os.PathLike, raw_config: dict, *, shards: int) -> Path:
    """A checkpoint directory with `raw_config` as config.json and every tensor of the published
    MXFP4 layout at its real shape, in `shards` files whose data regions are holes (nothing is
    allocated on disk; reading a tensor gives zeros). Good for plans and dry runs at full size."""
    return write_sparse_shards(out_dir, hf_specs(config_from_dict(raw_config)), raw_config, shards=shards)


def write_sparse_shards(out_dir: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], str]],
                        raw_config: dict, *, shards: int) -> Path:
    """`specs` ({name: (shape, dtype)}, in order) as `shards` safetensors files of real headers
    over data holes, with an index and `raw_config` as config.json; any model family."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nbytes = {n: DTYPES[dt].itemsize * math.prod(shape) for n, (shape, dt) in specs.items()}
    groups = split_evenly(nbytes, shards)
    names = shard_names(len(groups))
    for fname, group in zip(names, groups):
        prefix, _ = build_header([(n, specs[n][1], specs[n][0]) for n in group], {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(prefix)
            f.truncate(len(prefix) + sum(nbytes[n] for n in group))
    index = {"metadata": {"total_size": sum(nbytes.values())},
             "weight_map": {n: f for f, g in zip(names, groups) for n in g}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    return out
