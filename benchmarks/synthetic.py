"""Shape-faithful synthetic gpt-oss checkpoints: the real 20b/120b tensor shapes, any layer count.

Random bytes, written tensor by tensor (memory stays at one tensor), in the published MXFP4
layout: sharded safetensors + index + config.json. Values are finite (BF16 exponents capped,
MXFP4 scales 110..126), so every converter path runs as on the real weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gptoss_convert.io.safetensors import DTYPES, ShardWriter
from gptoss_convert.testing.published import published_config

def config(model: str = "20b", layers: int = 2) -> dict:
    """The published gpt-oss-<model> config.json with only the layer count cut to `layers`."""
    c = published_config(f"gpt-oss-{model}")
    c.update(num_hidden_layers=layers, layer_types=c["layer_types"][:layers])
    return c


def tensor_specs(c: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    H, inter, E, V = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    Nq, Nkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    specs = [("model.embed_tokens.weight", "BF16", (V, H))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", "BF16", (H,)), (p + "post_attention_layernorm.weight", "BF16", (H,))]
        for n, rows in (("q", Nq * D), ("k", Nkv * D), ("v", Nkv * D)):
            specs += [(p + f"self_attn.{n}_proj.weight", "BF16", (rows, H)),
                      (p + f"self_attn.{n}_proj.bias", "BF16", (rows,))]
        specs += [(p + "self_attn.o_proj.weight", "BF16", (H, Nq * D)), (p + "self_attn.o_proj.bias", "BF16", (H,)),
                  (p + "self_attn.sinks", "BF16", (Nq,)),
                  (p + "mlp.router.weight", "BF16", (E, H)), (p + "mlp.router.bias", "BF16", (E,)),
                  (p + "mlp.experts.gate_up_proj_blocks", "U8", (E, 2 * inter, H // 32, 16)),
                  (p + "mlp.experts.gate_up_proj_scales", "U8", (E, 2 * inter, H // 32)),
                  (p + "mlp.experts.gate_up_proj_bias", "BF16", (E, 2 * inter)),
                  (p + "mlp.experts.down_proj_blocks", "U8", (E, H, inter // 32, 16)),
                  (p + "mlp.experts.down_proj_scales", "U8", (E, H, inter // 32)),
                  (p + "mlp.experts.down_proj_bias", "BF16", (E, H))]
    specs += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (V, H))]
    return specs


def _random(rng, name: str, dtype: str, shape) -> np.ndarray:
    if name.endswith("_scales"):
        return rng.integers(110, 127, shape, dtype=np.uint8)
    if name.endswith("_scale_inv"):                       # FP8 block scales: positive, as amax / 448 would be
        return rng.uniform(2.0 ** -12, 2.0 ** -6, shape).astype(DTYPES[dtype])
    if dtype == "F8_E4M3":
        b = rng.integers(0, 256, shape, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] ^= 1                        # no NaN bytes
        return b.view(DTYPES[dtype])
    if dtype == "U8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16) & 0xBFFF   # exponent < 128: finite, |x| < 2
    return bits.view(DTYPES["BF16"])


def split_shards(specs: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int) -> list[list]:
    """`specs` in order, cut into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for s in specs:
        n = int(np.prod(s[2])) * DTYPES[s[1]].itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


BLOCK_BYTES = 64 << 20     # largest piece of random data held at once (the embedding is 1.16 GB)


def _write_tensor(w: ShardWriter, rng, name: str, dtype: str, shape: tuple[int, ...]) -> None:
    """Random data for one tensor, appended in row blocks of at most BLOCK_BYTES."""
    row = int(np.prod(shape[1:])) * DTYPES[dtype].itemsize if len(shape) > 1 else 0
    rows = max(1, BLOCK_BYTES // row) if row else None
    if rows is None or rows >= shape[0]:
        w.write(name, _random(rng, name, dtype, shape))
        return
    for start in range(0, shape[0], rows):
        w.append(name, _random(rng, name, dtype, (min(rows, shape[0] - start), *shape[1:])))


def gpt_oss_shard_name(k: int, n: int) -> str:
    """openai/gpt-oss numbering: from zero, `-of-` the last index."""
    return f"model-{k:05d}-of-{n - 1:05d}.safetensors"


def write(out: str | Path, model: str = "20b", layers: int = 2, shard_bytes: int = 4 << 30, seed: int = 0,
          cfg: dict | None = None, specs: list[tuple[str, str, tuple[int, ...]]] | None = None,
          shard_name=gpt_oss_shard_name) -> Path:
    """Write the synthetic checkpoint (with `cfg` as its config.json if given, else `config(model,
    layers)`; its tensors `specs` if given, else gpt-oss's for that config; shard k of n named
    `shard_name(k, n)`); returns its directory (skips work if already complete). Memory: one row block."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    c = cfg or config(model, layers)
    shards = split_shards(specs or tensor_specs(c), shard_bytes)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = shard_name(k, len(shards))
        w = ShardWriter(out / fname, shard, {"format": "pt"})
        for name, dtype, shape in shard:
            _write_tensor(w, rng, name, dtype, shape)
            weight_map[name] = fname
            total += int(np.prod(shape)) * DTYPES[dtype].itemsize
        w.close(fsync=False)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(c, indent=2))     # last: marks the checkpoint complete
    return out

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--model", choices=["20b", "120b"], default="20b")
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    print(write(a.out, a.model, a.layers))
