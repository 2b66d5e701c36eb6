"""The round trip MXFP4 -> Orbax -> MXFP4 at real gpt-oss-20b shapes: `to-orbax --scanned` on a
synthetic MXFP4 checkpoint (benchmarks/synthetic.py: the published config, every tensor at its
real shape; `--layers` cuts only the layer count), then `to-hf --mxfp4` of that Orbax checkpoint.

    python -m benchmarks.bench_export --workdir /work/bench-tmp/export [--layers 24] [--json export.json]
        [--baseline DIR --repeat 2] [--rounds 3 --cold]

`--rounds N` runs to-orbax and to-hf alternately N times, so that the two see the same
machine; the ratio is given per round (the source is written again for each round, unless
`--keep-source`, which needs source + Orbax + export on disk at once: ~70 GB at full size).
`--cold` drops the page cache before each conversion (needs root): both then read their input
from disk, as after a reboot or a copy from elsewhere, and neither gains from what the other
left in memory (at full size the Orbax checkpoint, 42 GB, does not fit in this machine's
memory anyway).

`--baseline DIR` (a tree of an older commit, e.g. `git archive OLD | tar -x -C DIR`) measures
the export side by side: `--repeat` rounds of to-hf by DIR's code, then by this tree's, on the
same Orbax checkpoint, alternating so that both see the same load; the two exports' shards
must be byte-identical.

Each conversion runs in a fresh process (its own peak RSS, VmHWM). Rates are given on the BF16
side (bytes of the Orbax checkpoint: what to-orbax writes and to-hf reads), so the two compare
directly. Before to-orbax, the sampled experts' source blocks and scales are kept; the source is
then deleted (`--keep-source` keeps it) so that at most source + Orbax exist at once.

The oracle, on `--experts` sampled (layer, expert) pairs of both projections: every dequantized
value of the export equals the source's (value-exact), and the bytes differ exactly in the
groups where they must: the ones whose largest magnitude is below code 4.0 (re-encoded at a
smaller scale by either rule) and all-zero groups when the rule's zero scale differs; the
prediction is made from the source bytes alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic
from benchmarks.bench_convert import run_child, tree_bytes
from benchmarks.bench_fullsize import check_output, samples
from benchmarks.common import machine, run_isolated

EXPORT = """
import json, sys, time
src, out, rule, *code = sys.argv[1:]
sys.path[:0] = code          # before the working directory, which `python -c` puts first
import gptoss_convert
from gptoss_convert.converters.to_hf import to_hf
t0 = time.perf_counter()
to_hf(src, out, mxfp4=True, scale_rule=rule, progress=False, log=lambda *_: None)
print(json.dumps({"seconds": time.perf_counter() - t0, "code": gptoss_convert.__file__}))
"""
PROJECTIONS = ("gate_up_proj", "down_proj")


def keep_samples(src: Path, pairs: list[tuple[int, int]]) -> dict:
    """{(layer, expert, proj): (blocks, scales)} read from the source before it is deleted."""
    from gptoss_convert.io.hf_checkpoint import open_checkpoint
    from gptoss_convert.io.safetensors import read_tensor
    ck = open_checkpoint(src)
    out = {}
    for layer, e in pairs:
        for proj in PROJECTIONS:
            vt = ck.tensors[f"model.layers.{layer}.mlp.experts.{proj}"]
            blocks, scales = (read_tensor(info, slice(e, e + 1)) for info in vt.sources)
            out[layer, e, proj] = (blocks, scales)
    return out


def expected_diff(blocks: np.ndarray, scales: np.ndarray, rule: str) -> np.ndarray:
    """Groups whose bytes a requantization of their values must change (see the module doc)."""
    from gptoss_convert.mxfp4.codec import FP4_VALUES
    codes = np.stack([blocks & 0xF, blocks >> 4], -1).reshape(*scales.shape, 32)
    mag = np.abs(FP4_VALUES[codes]).max(-1)
    zero_scale = 0 if rule == "triton" else 127
    return ((mag > 0) & (mag < 4)) | ((mag == 0) & (scales != zero_scale))


def compare(out: Path, kept: dict, rule: str) -> dict:
    """The oracle on every kept sample; {compared, mismatches, groups_reencoded}."""
    from gptoss_convert.io.safetensors import read_header, read_tensor
    from gptoss_convert.mxfp4.codec import dequantize
    infos = {}
    for f in sorted(out.glob("*.safetensors")):
        infos |= read_header(f)[0]
    mismatches, reencoded = [], 0
    for (layer, e, proj), (wb, ws) in kept.items():
        name = f"model.layers.{layer}.mlp.experts.{proj}"
        gb = read_tensor(infos[name + "_blocks"], slice(e, e + 1))
        gs = read_tensor(infos[name + "_scales"], slice(e, e + 1))
        same_values = np.array_equal(dequantize(gb, gs, np.float32).view(np.uint32),
                                     dequantize(wb, ws, np.float32).view(np.uint32))
        differ = (gs != ws) | (gb != wb).any(-1)
        want = expected_diff(wb, ws, rule)
        reencoded += int(differ.sum())
        if not same_values or not np.array_equal(differ, want):
            mismatches.append(f"{name} expert {e}")
    return {"compared": len(kept), "mismatches": mismatches, "groups_reencoded": reencoded}


def drop_page_cache() -> None:
    """Write back dirty pages and drop the page cache (root only): each conversion starts cold,
    and none pays for the previous one's write-back."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(fn, *args) -> tuple[float, float, float]:
    """(seconds, peak RSS GB, CPU seconds) of one child conversion."""
    cpu0 = cpu_children()
    secs, rss = fn(*args)
    return secs, rss, cpu_children() - cpu0


def export_child(src: Path, out: Path, rule: str, code: str | None = None) -> tuple[float, float]:
    """to-hf --mxfp4 in a fresh process, by this tree's code or that of the tree `code`."""
    result, peak_mb = run_isolated(EXPORT, [str(src), str(out), rule] + ([code] if code else []))
    if code and not result["code"].startswith(str(Path(code).resolve())):
        raise SystemExit(f"the baseline run imported {result['code']}, not the code in {code}")
    return result["seconds"], peak_mb * 2**20 / 1e9


def shard_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def side_by_side(orbax: Path, work: Path, a, bf16: int) -> list[dict]:
    """Alternating rounds of to-hf by the baseline's code and this tree's; outputs compared."""
    rows = []
    for i in range(a.repeat):
        digests = {}
        for label, code in (("baseline", a.baseline), ("this tree", None)):
            out = work / f"hf-{i}-{'new' if code is None else 'old'}"
            shutil.rmtree(out, ignore_errors=True)
            if a.cold:
                drop_page_cache()
            secs, rss, cpu = timed(export_child, orbax, out, a.rule, code)
            rows.append(row(f"to-hf --mxfp4 --scale-rule {a.rule} ({label}, round {i + 1})", secs, rss, cpu, bf16,
                            tree_bytes(out)))
            digests[label] = shard_digest(out)
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out)
        rows[-1]["identical_to_baseline"] = len(set(digests.values())) == 1
        if not rows[-1]["identical_to_baseline"]:
            raise SystemExit(f"round {i + 1}: the export differs from the baseline's")
    return rows


def row(command: str, secs: float, rss: float, cpu: float, bf16_bytes: int, written: int) -> dict:
    return {"command": command, "seconds": round(secs, 1), "bf16_GB": round(bf16_bytes / 1e9, 2),
            "bf16_GB_per_s": round(bf16_bytes / secs / 1e9, 3), "written_GB": round(written / 1e9, 2),
            "peak_rss_GB": round(rss, 2), "cpu_s": round(cpu, 1), "load_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="not inside a repository; needs source + Orbax of disk")
    ap.add_argument("--layers", type=int, default=24, help="layers of the synthetic 20b (24 = full size)")
    ap.add_argument("--rule", choices=["triton", "ocp"], default="triton")
    ap.add_argument("--experts", type=int, default=16, help="sampled (layer, expert) pairs, at least")
    ap.add_argument("--keep-source", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline", default=None, help="tree of an older commit: its to-hf side by side with this one")
    ap.add_argument("--repeat", type=int, default=2, help="side-by-side rounds (with --baseline)")
    ap.add_argument("--rounds", type=int, default=1, help="to-orbax and to-hf alternately, this many times")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each conversion (root)")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = synthetic.config("20b", a.layers)
    src, orbax, hf = work / f"synthetic-20b-{a.layers}L", work / "orbax", work / "hf-mxfp4"
    rows, kept = [], None
    for r in range(a.rounds):
        last = r + 1 == a.rounds
        shutil.rmtree(orbax, ignore_errors=True)
        if kept is None or not src.exists():         # the same bytes each time (a fixed seed)
            t0 = time.perf_counter()
            synthetic.write(src, cfg=cfg, shard_bytes=5 << 30)
            source_bytes = tree_bytes(src)
            print(json.dumps({"source_GB": round(source_bytes / 1e9, 2), "made_s": round(time.perf_counter() - t0, 1)}),
                  flush=True)
            kept = kept or keep_samples(src, samples(cfg, a.experts, 2)["experts"])
        if a.cold:
            drop_page_cache()
        secs, rss, cpu = timed(run_child, ["scanned", str(src), str(orbax)])
        bf16 = tree_bytes(orbax)
        rows.append(row("to-orbax --scanned", secs, rss, cpu, bf16, bf16) | {"round": r + 1})
        print(json.dumps(rows[-1]), flush=True)
        if not a.keep_source:
            shutil.rmtree(src)
        if last and a.baseline:
            rows += side_by_side(orbax, work, a, bf16)
        shutil.rmtree(hf, ignore_errors=True)
        if a.cold:
            drop_page_cache()
        secs, rss, cpu = timed(export_child, orbax, hf, a.rule)
        rows.append(row(f"to-hf --mxfp4 --scale-rule {a.rule}", secs, rss, cpu, bf16, tree_bytes(hf))
                    | {"round": r + 1})
        rows[-1]["ratio_to_to_orbax"] = round(rows[-1]["bf16_GB_per_s"] / rows[-2]["bf16_GB_per_s"], 2)
        if last:
            rows[-1]["check_s"] = round(check_output(hf), 1)
            rows[-1]["oracle"] = compare(hf, kept, a.rule)
            rows[-1]["requantization"] = {k: v for k, v in json.loads((hf / "conversion.json").read_text())
                                          ["requantization"].items() if k != "tensors"}
        else:
            shutil.rmtree(hf)
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(orbax)
    shutil.rmtree(hf)
    report = {"machine": machine(), "layers": a.layers, "source_GB": round(source_bytes / 1e9, 2), "cold": a.cold,
              "rows": rows}
    print(f"machine: {report['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
