"""Full size: a synthetic gpt-oss-20b with every real shape (the published config: 24 layers,
32 experts, vocab 201088; 13.8 GB of MXFP4 safetensors in 3 shards), converted by `dequantize`,
`to-orbax --scanned` and `to-orbax --unscanned`, each output checked (`check`) and compared with
transformers' own dequantizer on the source, bit for bit; then gpt-oss-120b's plan from
real-shape sparse shards (`to-orbax --dry-run`).

    python -m benchmarks.bench_fullsize --workdir /work/bench-tmp [--json fullsize.json]

Each conversion runs in a fresh process (its own peak RSS, VmHWM). Right after it, and after its
output is deleted, the disk's O_DIRECT write bandwidth is measured on `--baseline-gb` GB, so
each ratio is against the disk as it was at that moment. The source is generated once in
64 MB row blocks (bounded memory) and reused; only one output exists at a time (~42 GB).

The oracle: `transformers.integrations.mxfp4.convert_moe_packed_tensors` on the source blocks
and scales of `--experts` sampled (layer, expert) pairs, every projection (gate_up and down),
and the source's own BF16 rows for sampled embedding rows and LM-head rows (= logits_dense
columns). Each output is read back by another path than the converter's: the `safetensors`
package for the BF16 directory, TensorStore (io.orbax_reader) for the Orbax ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic
from benchmarks.bench_convert import direct_write_bandwidth, run_child, tree_bytes
from benchmarks.common import machine

PROJECTIONS = ("gate_up_proj", "down_proj")


def published_config(model: str, override: str | None) -> dict:
    """The published config.json of gpt-oss-`model` (package data), or the file `override`."""
    if override:
        return json.loads(Path(override).read_text())
    from gptoss_convert.testing.published import published_config as config
    return config(f"gpt-oss-{model}")


def samples(cfg: dict, n_experts: int, n_rows: int, seed: int = 0) -> dict:
    """(layer, expert) pairs spread over all layers (both attention kinds) and token ids,
    first and last included."""
    rng = np.random.default_rng(seed)
    L, V = cfg["num_hidden_layers"], cfg["vocab_size"]
    E = cfg.get("num_local_experts") or cfg["num_experts"]                  # gpt-oss or Qwen3-MoE
    layers = [int(x) for x in np.linspace(0, L - 1, n_experts).round()]
    pairs = sorted({(layer, int(rng.integers(E))) for layer in layers} | {(0, 0), (L - 1, E - 1)})
    rows = sorted({0, V - 1, *(int(r) for r in rng.integers(0, V, n_rows - 2))})
    return {"experts": pairs, "rows": rows}


# --- the oracle ------------------------------------------------------------------------------

class Source:
    """The source checkpoint read with the `safetensors` package (torch tensors)."""

    def __init__(self, src: Path):
        self.dir = src
        self.where = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def slice(self, name: str, index):
        from safetensors import safe_open
        with safe_open(self.dir / self.where[name], framework="pt") as f:
            return f.get_slice(name)[index]

    def expert(self, layer: int, e: int, proj: str):
        """transformers' dequantization of one expert: [1, in, out] bf16 (HF orientation)."""
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        p = f"model.layers.{layer}.mlp.experts.{proj}"
        blocks, scales = self.slice(p + "_blocks", slice(e, e + 1)), self.slice(p + "_scales", slice(e, e + 1))
        return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)


def bits(x) -> np.ndarray:
    """The raw 16-bit patterns of a bf16 torch tensor or numpy (ml_dtypes) array."""
    if hasattr(x, "numpy"):
        import torch
        return x.contiguous().view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(x).view(np.uint16)


def expected(src: Source, s: dict):
    """Yield (what, reference bits, key) for every sampled value; `key` says where it lives."""
    for layer, e in s["experts"]:
        for proj in PROJECTIONS:
            yield f"layer {layer} expert {e} {proj}", bits(src.expert(layer, e, proj)[0]), ("expert", layer, e, proj)
    yield from expected_rows(src, s["rows"])


def expected_rows(src: Source, rows: list[int]):
    """The sampled embedding and LM-head rows, as the source's own BF16 (any family)."""
    yield (f"embedding rows {rows}", np.stack([bits(src.slice("model.embed_tokens.weight", r)) for r in rows]),
           ("embed",))
    yield f"LM head rows {rows}", np.stack([bits(src.slice("lm_head.weight", r)) for r in rows]), ("lm_head",)


def read_safetensors(out: Path, key: tuple, rows: list[int]) -> np.ndarray:
    """What the dequantized BF16 directory holds for `key`, read with the safetensors package."""
    src = Source(out)
    if key[0] == "expert":
        _, layer, e, proj = key
        return bits(src.slice(f"model.layers.{layer}.mlp.experts.{proj}", e))
    name = "model.embed_tokens.weight" if key[0] == "embed" else "lm_head.weight"
    return np.stack([bits(src.slice(name, r)) for r in rows])


def read_orbax(out: Path, key: tuple, rows: list[int], scanned: bool) -> np.ndarray:
    """What an Orbax output holds for `key` (TensorStore, io.orbax_reader): gate_up is
    rebuilt from wi_0 (even columns) and wi_1 (odd), the LM head from logits_dense's columns."""
    from gptoss_convert.io.orbax_reader import open_leaf
    step = out / "0"
    if key[0] != "expert":
        return read_orbax_rows(out, key, rows)
    _, layer, e, proj = key
    prefix = f"decoder/layers/layers_{layer % 2}/GptOssMlp/" if scanned else f"decoder/layers_{layer}/GptOssMlp/"
    at = (e, layer // 2) if scanned else (e,)                                 # scanned: slot at axis 1
    if proj == "down_proj":
        return bits(open_leaf(step, prefix + "wo")[at].read().result())      # [I, H]
    wi0, wi1 = (bits(open_leaf(step, prefix + w)[at].read().result()) for w in ("wi_0", "wi_1"))
    gate_up = np.empty((wi0.shape[0], 2 * wi0.shape[1]), np.uint16)         # [H, 2I], interleaved
    gate_up[:, 0::2], gate_up[:, 1::2] = wi0, wi1
    return gate_up


def read_orbax_rows(out: Path, key: tuple, rows: list[int]) -> np.ndarray:
    """The embedding rows (key ("embed",)) or LM-head rows (("lm_head",): logits_dense's columns)
    of an Orbax output, read with TensorStore; the same leaves in every family."""
    from gptoss_convert.io.orbax_reader import open_leaf
    if key[0] == "embed":
        leaf = open_leaf(out / "0", "token_embedder/embedding")
        return np.stack([bits(leaf[r].read().result()) for r in rows])
    leaf = open_leaf(out / "0", "decoder/logits_dense/kernel")                # [H, V]
    return np.stack([bits(leaf[:, r].read().result()) for r in rows])


def compare(src: Source, out: Path, cmd: str, s: dict) -> dict:
    """Every sampled value of `out` against the oracle; {compared, mismatches}."""
    if cmd == "dequantize":
        return compare_all(expected(src, s), lambda key: read_safetensors(out, key, s["rows"]))
    return compare_all(expected(src, s), lambda key: read_orbax(out, key, s["rows"], scanned=(cmd == "scanned")))


def compare_all(items, read) -> dict:
    """Each (what, reference bits, key) of `items` against `read(key)`; {compared, mismatches}."""
    mismatches, n = [], 0
    for what, want, key in items:
        got = read(key)
        n += 1
        if got.shape != want.shape or not np.array_equal(got, want):
            mismatches.append(what)
    return {"compared": n, "mismatches": mismatches}


# --- the conversions -------------------------------------------------------------------------

def check_output(out: Path) -> float:
    """Seconds `gptoss-convert check` takes on `out` (it raises if anything is off)."""
    from gptoss_convert.converters.check import check
    t0 = time.perf_counter()
    check(out, log=lambda *_: None)
    return time.perf_counter() - t0


def child_cpu() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process's finished children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


def set_source_cache(src: Source, how: str) -> None:
    """Put the source in the page cache ("warm": read it through), out of it ("cold": drop its
    pages, so the conversion reads the disk as a fresh download would), or leave it ("as-is")."""
    for f in sorted(src.dir.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            if how == "cold":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            elif how == "warm":
                while fh.read(64 << 20):
                    pass


def convert_row(cmd: str, src: Source, out: Path, s: dict, baseline_bytes: int, oracle=compare,
                source_cache: str = "as-is") -> dict:
    """One conversion in its own process, then check, `oracle(src, out, cmd, s)` and the O_DIRECT baseline."""
    shutil.rmtree(out, ignore_errors=True)
    set_source_cache(src, source_cache)
    cpu0 = child_cpu()
    secs, rss = run_child([cmd, str(src.dir), str(out)])
    user, sys_ = (b - a for a, b in zip(cpu0, child_cpu()))
    written = tree_bytes(out)
    check_s = check_output(out)
    t0 = time.perf_counter()
    found = oracle(src, out, cmd, s)
    oracle_s = time.perf_counter() - t0
    shutil.rmtree(out)
    direct = direct_write_bandwidth(out.parent / "bandwidth.bin", min(written, baseline_bytes))
    gbps = written / secs / 1e9
    return {"command": cmd if cmd == "dequantize" else f"to-orbax --{cmd}", "source_cache": source_cache,
            "written_GB": round(written / 1e9, 2),
            "seconds": round(secs, 1), "GB_per_s": round(gbps, 3), "peak_rss_GB": round(rss, 2),
            "user_s": round(user, 1), "sys_s": round(sys_, 1), "load_1m": round(os.getloadavg()[0], 1),
            "o_direct_GB_per_s": direct and round(direct, 3), "ratio_to_o_direct": direct and round(gbps / direct, 2),
            "check_s": round(check_s, 1), "oracle_compared": found["compared"],
            "oracle_mismatches": found["mismatches"], "oracle_s": round(oracle_s, 1)}


# --- gpt-oss-120b: the plan from sparse shards -----------------------------------------------

def dry_run_120b(work: Path, cfg: dict, **kw) -> dict:
    """`to-orbax --dry-run --scanned` on real-shape sparse 120b shards (15, as published)."""
    from gptoss_convert.testing.tiny import write_sparse_checkpoint
    return dry_run(work / "sparse-120b", lambda d: write_sparse_checkpoint(d, cfg, shards=15), **kw)


def dry_run(src: Path, write_sparse, **kw) -> dict:
    """`to-orbax --dry-run --scanned` on the real-shape sparse shards `write_sparse(src)` writes
    (any family): its summary lines and the source's size; the shards are deleted after."""
    from gptoss_convert.converters.to_orbax import to_orbax
    write_sparse(src)
    lines: list[str] = []
    to_orbax(src, src.parent / "never-written", scanned=True, dry_run=True, log=lines.append, **kw)
    source = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    shutil.rmtree(src)
    return {"source_GB": round(source / 1e9, 2), "summary": lines[-1].splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="not inside a repository: needs ~60 GB free")
    ap.add_argument("--commands", nargs="+", default=["dequantize", "scanned", "unscanned"])
    ap.add_argument("--experts", type=int, default=16, help="sampled (layer, expert) pairs, at least")
    ap.add_argument("--rows", type=int, default=8, help="sampled embedding rows and LM-head columns")
    ap.add_argument("--baseline-gb", type=float, default=16.0, help="GB written for each O_DIRECT baseline")
    ap.add_argument("--config", default=None, help="a gpt-oss-20b config.json instead of the published one")
    ap.add_argument("--config-120b", default=None, help="a gpt-oss-120b config.json instead of the published one")
    ap.add_argument("--source-cache", nargs="+", choices=["as-is", "warm", "cold"], default=["as-is"],
                    help="before each conversion: leave the source's pages, read them in, or drop them (one row each)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = published_config("20b", a.config)
    t0 = time.perf_counter()
    src = Source(synthetic.write(work / "synthetic-20b-full", cfg=cfg, shard_bytes=5 << 30))
    print(json.dumps({"source_GB": round(tree_bytes(src.dir) / 1e9, 2),
                      "made_or_found_s": round(time.perf_counter() - t0, 1)}))
    s = samples(cfg, a.experts, a.rows)
    rows = []
    for cache in a.source_cache:
        for cmd in a.commands:
            rows.append(convert_row(cmd, src, work / f"out-{cmd}", s, int(a.baseline_gb * 1e9), source_cache=cache))
            print(json.dumps(rows[-1]), flush=True)
    plan_120b = dry_run_120b(work, published_config("120b", a.config_120b))
    print(json.dumps(plan_120b))
    report = {"machine": machine(), "samples": s, "rows": rows, "gpt-oss-120b": plan_120b}
    print(f"machine: {report['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
