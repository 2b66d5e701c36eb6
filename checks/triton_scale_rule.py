"""Check `quantize(w, rule="triton")` against triton_kernels' own `downcast_to_mxfp`.

triton_kernels is not a dependency of this project and is not on the package index by itself;
vLLM's wheel carries a copy (`vllm/third_party/triton_kernels`). Unpack it onto PYTHONPATH as
the top-level package `triton_kernels`, on a machine with a CUDA GPU, torch and triton:

    pip download --no-deps vllm && unzip -q vllm-*.whl 'vllm/third_party/triton_kernels/*' -d /tmp/v
    mkdir -p /tmp/tk && cp -r /tmp/v/vllm/third_party/triton_kernels /tmp/tk/
    PYTHONPATH=/tmp/tk:$PWD python3 checks/triton_scale_rule.py --out triton_rule.json

`--reference torch` uses triton_kernels' pure-PyTorch reference (`downcast_to_mxfp_torch`,
`upcast_from_mxfp_torch`, what its own tests hold the kernel to) instead of the GPU kernel: it
runs on a CPU, with `triton` installed only for its import (`pip install triton`).

It compares, byte for byte, this project's numpy encoder (`--rule`) with triton_kernels on bf16, fp16 and fp32
weights of several kinds (normal, heavy-tailed, values already MXFP4, groups at the bottom and
top of the exponent range, all-zero groups), and this project's decoder with the kernel's
`upcast_from_mxfp`. Prints one line per case and exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys

import ml_dtypes
import numpy as np
import torch
from triton_kernels.numerics_details import mxfp

from gptoss_convert.mxfp4.codec import dequantize, quantize

SHAPE = (4, 384, 2880)          # [experts, rows, cols]: gpt-oss's hidden size on the quantized axis
TORCH = {np.dtype(ml_dtypes.bfloat16): torch.bfloat16, np.dtype(np.float16): torch.float16,
         np.dtype(np.float32): torch.float32}


def _cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """name -> fp32 weights before the cast to each input dtype."""
    normal = rng.normal(0, 0.02, SHAPE).astype(np.float32)
    heavy = (rng.standard_t(2, SHAPE) * 0.01).astype(np.float32)
    blocks = rng.integers(0, 256, (*SHAPE[:-1], SHAPE[-1] // 32, 16), dtype=np.uint8)
    scales = rng.integers(120, 128, SHAPE[:-1] + (SHAPE[-1] // 32,), dtype=np.uint8)
    already = dequantize(blocks, scales, np.float32, workers=1)
    groups = normal.reshape(-1, 32).copy()
    k = groups.shape[0]
    groups[: k // 8] *= np.float32(2.0 ** -120)           # bottom of the range: scale clamps
    groups[k // 8: k // 4] = 0.0                           # all-zero groups
    groups[k // 4: 3 * k // 8] *= np.float32(2.0 ** 100)   # top of the range (bf16 and fp32 only)
    extremes = groups.reshape(SHAPE)
    return {"normal": normal, "heavy_tailed": heavy, "already_mxfp4": already, "extremes": extremes}


class Reference:
    """triton_kernels' encoder and decoder: the GPU kernels, or their PyTorch reference on the CPU."""

    def __init__(self, kind: str):
        self.kind = kind
        self.device = "cuda" if kind == "kernel" else "cpu"
        self.down = mxfp.downcast_to_mxfp if kind == "kernel" else mxfp.downcast_to_mxfp_torch
        self.up = mxfp.upcast_from_mxfp if kind == "kernel" else mxfp.upcast_from_mxfp_torch

    def encode(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(w.view(np.uint16) if w.dtype == ml_dtypes.bfloat16 else w)
        t = t.view(torch.bfloat16) if w.dtype == ml_dtypes.bfloat16 else t
        q, s = self.down(t.to(self.device), torch.uint8, axis=-1)
        return q.cpu().numpy(), s.cpu().numpy()

    def decode(self, q: np.ndarray, s: np.ndarray) -> np.ndarray:
        q, s = torch.from_numpy(q).to(self.device), torch.from_numpy(s).to(self.device)
        return self.up(q, s, torch.float32, axis=-1).cpu().numpy()


def _compare(ref: Reference, name: str, w: np.ndarray, rule: str) -> dict:
    q_ref, s_ref = ref.encode(w)
    blocks, scales = quantize(w, rule=rule)
    q = blocks.reshape(q_ref.shape)
    groups = (q != q_ref).reshape(*q.shape[:-1], -1, 16).any(-1) | (scales != s_ref)
    ours_back = dequantize(blocks, scales, np.float32, workers=1)
    theirs_back = ref.decode(q_ref, s_ref)
    same_values = np.array_equal(ours_back, theirs_back, equal_nan=True)
    row = {"case": name, "dtype": str(w.dtype), "groups": int(scales.size),
           "block_bytes_differ": int(np.count_nonzero(q != q_ref)),
           "scale_bytes_differ": int(np.count_nonzero(scales != s_ref)),
           "groups_differ": int(np.count_nonzero(groups)), "decoders_agree": bool(same_values)}
    if row["groups_differ"]:
        g = tuple(int(i[0]) for i in np.nonzero(groups))
        row["first_difference"] = {"group": g, "scale_ours": int(scales[g]), "scale_theirs": int(s_ref[g])}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--reference", choices=["kernel", "torch"], default="kernel",
                    help="triton_kernels' GPU kernel, or its PyTorch reference on the CPU")
    ap.add_argument("--rule", choices=["triton", "triton-rtne"], default="triton",
                    help="this project's rule to hold against it: 'triton' for triton_kernels before its "
                         "ties-to-even change (triton PR #8110; vLLM's copy), 'triton-rtne' after it")
    args = ap.parse_args()
    ref = Reference(args.reference)
    rng = np.random.default_rng(0)
    rows = []
    for name, w in _cases(rng).items():
        for dtype in (ml_dtypes.bfloat16, np.float16, np.float32):
            if dtype == np.float16 and name == "extremes":
                continue                                   # 2**100 and 2**-120 are not fp16 values
            row = _compare(ref, name, w.astype(dtype), args.rule)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "reference": args.reference, "rule": args.rule, "rows": rows}, f,
                      indent=1)
    bad = [r for r in rows if r["groups_differ"] or not r["decoders_agree"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases: quantize(rule={args.rule!r}) byte-identical to "
          f"triton_kernels ({args.reference})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
