"""What the commands writing the published MXFP4 layout share (to-hf, merge-lora): which tensors
are MXFP4 there, the published quantization_config, config.json for an output, and the
requantization error report (summed per tensor, then summarized)."""

from __future__ import annotations

import math

from gptoss_convert.converters.shards import write_index
from gptoss_convert.converters.sources import write_sidecars

DEFAULT_SCALE_RULE = "triton"     # triton_kernels' downcast_to_mxfp as at gpt-oss's release; docs/formats.md §3
# gpt-oss tensors stored as MXFP4 in the published checkpoints (everything else is BF16 there)
MXFP4_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PUBLISHED_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                     "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def _add(total: dict, rep: dict) -> None:
    for k, v in rep.items():
        total[k] = total.get(k, 0) + v


def out_config(raw: dict, *, mxfp4: bool, dtype: str) -> dict:
    """config.json as published: BF16 has no quantization_config; MXFP4 has the published one
    (--like's own if it has one)."""
    conf = {k: v for k, v in raw.items() if k != "quantization_config"}
    conf |= {"dtype": dtype} | ({"torch_dtype": dtype} if "torch_dtype" in raw else {})
    if mxfp4:
        q = raw.get("quantization_config")
        ours = isinstance(q, dict) and q.get("quant_method") == "mxfp4"
        conf["quantization_config"] = q if ours else PUBLISHED_QUANTIZATION
    return conf


def summarize(reports: dict[str, dict]) -> dict:
    """Per tensor: relative RMS error, saturated values, clamped groups; and the totals."""
    per = {n: {"rel_rms": math.sqrt(r["err2"] / r["ref2"]) if r["ref2"] else 0.0, "saturated": r["saturated"],
               "clamped_groups": r["clamped_groups"]} for n, r in sorted(reports.items())}
    total: dict = {}
    for r in reports.values():
        _add(total, r)
    return {"tensors": per, "rel_rms": math.sqrt(total["err2"] / total["ref2"]) if total.get("ref2") else 0.0,
            "saturated": total.get("saturated", 0), "clamped_groups": total.get("clamped_groups", 0)}


def hf_metadata(raw: dict, sidecars: list, *, mxfp4: bool, dtype: str):
    """ShardsTarget's metadata hook for an HF output: config.json as published (out_config), the
    tokenizer and generation files, the index."""
    def metadata(out, names, shards) -> None:
        write_sidecars(out, out_config(raw, mxfp4=mxfp4, dtype=dtype), sidecars)
        write_index(out, names, shards)
    return metadata


def report_hook(mxfp4: bool):
    """ShardsTarget's report hook: every shard's requantization error summed (with --mxfp4)."""
    return (lambda reports: {"requantization": summarize(reports)}) if mxfp4 else (lambda reports: {})
