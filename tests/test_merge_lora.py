"""`merge-lora` against PEFT's own merge_and_unload(), transformers' logits and MXFP4 decoder, and
an independent numpy re-derivation of the MXFP4 rules; the protocol (resume onto the same bytes
of base AND adapter, dry run, check) and the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run_env
from gptoss_convert.converters.check import check
from gptoss_convert.converters.merge_lora import merge_lora
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.safetensors import read_header, read_tensor, save_file

QUIET = dict(progress=False, log=lambda *_: None)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
BF16 = np.dtype(ml_dtypes.bfloat16)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def stored(d: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as stored, by the safetensors header."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= {n: read_tensor(i) for n, i in read_header(f)[0].items()}
    return out


def _peft_model(base: Path, seed: int, **lora):
    """A PEFT LoRA on the fp32 transformers model of `base`, every A and B random (PEFT's B starts at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM
    model = get_peft_model(GptOssForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(3).integers(0, 300, (2, 9))


@pytest.fixture(scope="module")
def lora(bf16_dir, tmp_path_factory):
    """(adapter dir, PEFT's merged fp32 state dict, PEFT's merged logits, that model saved by
    transformers' save_pretrained): attention and experts."""
    root = tmp_path_factory.mktemp("lora")
    model = _peft_model(bf16_dir, 0, r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS)
    model.save_pretrained(root / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(root / "peft-merged")
    return (root / "adapter", {k: v.numpy().copy() for k, v in merged.state_dict().items()}, _logits(merged, TOKENS),
            root / "peft-merged")


@pytest.fixture(scope="module")
def merged(lora, bf16_dir, mxfp4_dir, tmp_path_factory):
    """merge-lora outputs: {(base, dtype, mxfp4, rule): OUT}."""
    root = tmp_path_factory.mktemp("merged")
    runs = [("bf16", "bf16", False, "triton"), ("mxfp4", "bf16", False, "triton"), ("mxfp4", "fp32", False, "triton"),
            ("mxfp4", "bf16", True, "triton"), ("bf16", "bf16", True, "ocp"),
            ("bf16", "bf16", True, "compressed-tensors")]
    dirs = {"bf16": bf16_dir, "mxfp4": mxfp4_dir}
    return {r: merge_lora(dirs[r[0]], lora[0], root / "-".join(map(str, r)), dtype=r[1], mxfp4=r[2], scale_rule=r[3],
                          max_shard_size="300KB", **QUIET) for r in runs}


@pytest.mark.parametrize("base", ["bf16", "mxfp4"])
def test_every_tensor_is_peft_merge_and_unload_rounded_to_bf16(merged, lora, bf16_dir, base):
    """Bit-equal: our fp32 W + scaling * (B @ A), rounded to BF16 once, is PEFT's fp32 merge rounded
    the same way (bound asserted: 0 differing bits), for every tensor; untouched ones are the base's."""
    got, ref, src = stored(merged[base, "bf16", False, "triton"]), lora[1], stored(bf16_dir)
    assert sorted(got) == sorted(ref)
    changed = [n for n in got if got[n].tobytes() != src[n].tobytes()]
    assert len(changed) == 6 * 6 and all(n.endswith(("_proj.weight", "_proj")) for n in changed)
    for n, arr in got.items():
        assert arr.dtype == BF16, n
        np.testing.assert_array_equal(arr.view(np.uint16), ref[n].astype(BF16).view(np.uint16), err_msg=n)


def test_fp32_output_equals_peft_bit_for_bit_and_gives_its_logits(merged, lora, bf16_dir):
    """--dtype fp32 from the MXFP4 base: every tensor is PEFT's fp32 merge bit for bit, and
    transformers' fp32 logits of it are PEFT's merged model's (max |Δ| < 1e-4; measured 0)."""
    from transformers import GptOssForCausalLM
    out = merged["mxfp4", "fp32", False, "triton"]
    got, ref = stored(out), lora[1]
    for n, arr in got.items():
        assert arr.dtype == np.float32 and arr.tobytes() == ref[n].tobytes(), n
    model, info = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    delta = np.abs(_logits(model, TOKENS) - lora[2]).max()
    assert delta < 1e-4, delta
    base = GptOssForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    assert np.abs(_logits(base, TOKENS) - lora[2]).max() > 1e-2        # the adapter does change the logits


def _round_e2m1(q: np.ndarray, ties_up: bool) -> np.ndarray:
    """|q| to the nearest E2M1 magnitude (saturating at 6); a tie up or to the even code."""
    d = np.abs(np.abs(q)[..., None] - E2M1)
    best = d.min(-1, keepdims=True)
    tied = d == best
    code = np.arange(8)
    if ties_up:
        idx = np.where(tied, code, -1).max(-1)                      # the larger magnitude
    else:
        idx = np.where(tied, code + 8 * (code % 2), 99).min(-1) % 8     # the even code
    return np.copysign(E2M1[idx], q)


def _scaled(w: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(w / scale, scale) for fp32 weights [E, in, out] in groups of 32 down `in`, re-derived:
    triton (both): scale 2**ceil(log2(fp32(amax / 6))), w * (1/scale) in fp32; ocp: 2**(floor(log2 amax) - 2)."""
    g = w.reshape(w.shape[0], w.shape[1] // 32, 32, w.shape[2]).astype(np.float32)
    amax = np.abs(g).max(axis=2, keepdims=True)
    if rule.startswith("triton"):
        bits = (amax / np.float32(6)).astype(np.float32).view(np.uint32)
        scale = ((bits + np.uint32(0x7FFFFF)) & np.uint32(0x7F800000)).view(np.float32)
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, 1, scale)).astype(np.float32)
        return (g * inv).astype(np.float32), scale
    exp = np.floor(np.log2(np.where(amax > 0, amax, 1).astype(np.float64))) - 2      # float64: exact floor
    scale = np.ldexp(np.float32(1), exp.astype(np.int32))
    return g / scale, scale


def _mxfp4_values(w: np.ndarray, rule: str) -> np.ndarray:
    """The values rule `rule` gives fp32 weights [E, in, out]: w / scale rounded to the nearest
    E2M1 value (ties up for "triton", to the even code otherwise; saturating at 6), times scale."""
    q, scale = _scaled(w, rule)
    return (_round_e2m1(q, rule == "triton") * scale).reshape(w.shape)


def _rule_values(w: np.ndarray, rule: str) -> np.ndarray:
    """The values `rule` gives fp32 expert weights [E, in, out]: compressed-tensors' own code for
    its rule (groups along `in`), the numpy re-derivation for the others."""
    if rule == "compressed-tensors":
        from test_scale_rules import ct_quantize
        return np.swapaxes(ct_quantize(np.ascontiguousarray(np.swapaxes(w, 1, 2)))[0], 1, 2)
    return _mxfp4_values(w, rule)


@pytest.mark.parametrize("base,rule", [("mxfp4", "triton"), ("bf16", "ocp"), ("bf16", "compressed-tensors")])
def test_mxfp4_experts_decoded_by_transformers_are_the_rule_applied_to_the_merged_fp32(merged, lora, base, rule):
    """--mxfp4: transformers' own MXFP4 decoder on our blocks/scales gives exactly the rule's
    quantization (compressed-tensors' own code, or re-derived here in numpy) of PEFT's merged fp32
    experts; the rest is BF16 as in the BF16 merge; config.json carries the published
    quantization_config."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    out = merged[base, "bf16", True, rule]
    got, ref, bf = stored(out), lora[1], stored(merged["bf16", "bf16", False, "triton"])
    experts = [n for n in ref if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 12 and sorted(got) == sorted(
        [n for n in bf if n not in experts] + [n + s for n in experts for s in ("_blocks", "_scales")])
    for n in experts:
        dec = convert_moe_packed_tensors(torch.from_numpy(got[n + "_blocks"]), torch.from_numpy(got[n + "_scales"]),
                                         dtype=torch.float32).numpy()
        assert dec.shape == ref[n].shape, n
        np.testing.assert_array_equal(dec, _rule_values(ref[n], rule), err_msg=n)
    for n in bf:
        if n not in experts:
            assert got[n].tobytes() == bf[n].tobytes(), n
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    rec = json.loads((out / "conversion.json").read_text())
    assert sorted(rec["requantization"]["tensors"]) == sorted(experts) and rec["requantization"]["rel_rms"] > 0
    assert rec["lora"]["r"] == 4 and rec["lora"]["scaling"] == [2.0] and rec["options"]["scale_rule"] == rule
    assert check(out, log=lambda *_: None)["command"] == "merge-lora"


def test_rslora_attention_only_with_scale_and_untouched_mxfp4_bytes_kept(mxfp4_dir, bf16_dir, tmp_path):
    """An rsLoRA adapter on attention only, merged with --scale 2.5: equal to PEFT with its
    scaling (alpha / sqrt(r)) times 2.5; with --mxfp4 the experts keep the base's bytes."""
    model = _peft_model(bf16_dir, 1, r=9, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"])
    model.save_pretrained(tmp_path / "a")
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * 6
    for m in layers:
        assert m.scaling["default"] == 6 / 3
        m.scaling["default"] *= 2.5
    ref = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    out = merge_lora(mxfp4_dir, tmp_path / "a", tmp_path / "o", mxfp4=True, scale=2.5, **QUIET)
    got, src = stored(out), stored(mxfp4_dir)
    assert sorted(got) == sorted(src)
    for n, arr in got.items():
        if n.endswith(("q_proj.weight", "o_proj.weight")):
            np.testing.assert_array_equal(arr.view(np.uint16), ref[n].astype(BF16).view(np.uint16), err_msg=n)
            assert arr.tobytes() != src[n].tobytes()
        else:
            assert arr.tobytes() == src[n].tobytes(), n
    rec = json.loads((out / "conversion.json").read_text())
    assert rec["lora"]["scaling"] == [5.0] and rec["requantization"]["tensors"] == {}


def _adapter_copy(lora, tmp_path: Path, config: dict | None = None, rename=None) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(lora[0], d)
    conf = json.loads((d / "adapter_config.json").read_text()) | (config or {})
    (d / "adapter_config.json").write_text(json.dumps(conf))
    if rename:
        tensors = stored(d)
        save_file({rename(k): v for k, v in tensors.items()}, d / "adapter_model.safetensors")
    return d


@pytest.mark.parametrize("config,match", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"bias": "all"}, "bias='none'"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"r": 8}, r"model\.layers\.\d\.\S+ \[.*expected A .* for r=8"), ({"peft_type": "IA3"}, "LoRA only")])
def test_refusals_are_one_line_naming_what_and_what_to_do(lora, bf16_dir, tmp_path, config, match):
    d = _adapter_copy(lora, tmp_path, config)
    with pytest.raises(InputError, match=match) as e:
        merge_lora(bf16_dir, d, tmp_path / "o", **QUIET)
    assert "\n" not in e.value.one_line() and not (tmp_path / "o").exists()


def test_a_pair_matching_no_base_tensor_is_refused_naming_it(lora, bf16_dir, tmp_path):
    d = _adapter_copy(lora, tmp_path, rename=lambda k: k.replace("layers.3.self_attn.k_proj", "layers.3.self_attn.kv"))
    with pytest.raises(InputError, match=r"model\.layers\.3\.self_attn\.kv\.lora_A/B match no tensor"):
        merge_lora(bf16_dir, d, tmp_path / "o", **QUIET)


def test_dry_run_writes_nothing_and_out_in_the_adapter_is_refused(lora, mxfp4_dir, tmp_path):
    lines = []
    plan = merge_lora(mxfp4_dir, lora[0], tmp_path / "o", mxfp4=True, dry_run=True, progress=False, log=lines.append)
    assert not list(tmp_path.iterdir())
    hows = {t.name: t.how for t in plan.tensors}
    assert hows["model.layers.2.mlp.experts.down_proj"] == "quantize"
    assert hows["model.layers.2.mlp.router.weight"] == "copy"
    assert hows["model.layers.2.self_attn.v_proj.weight"] == "merge" and "36 tensors" in lines[0]
    with pytest.raises(OutputError, match="adapter directory"):
        merge_lora(mxfp4_dir, lora[0], lora[0] / "out", **QUIET)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *map(str, args)], capture_output=True, text=True,
                          env=run_env() | (env or {}), timeout=300)


@pytest.mark.slow
def test_cli_resume_onto_a_changed_adapter_byte_is_refused(lora, mxfp4_dir, merged, tmp_path):
    """Kill a run after a shard is journaled, flip one byte of adapter_model.safetensors (same
    size): --resume is refused naming adapter/adapter_model.safetensors; with the byte back it
    finishes, byte-identical to the uninterrupted run."""
    adapter = _adapter_copy(lora, tmp_path)
    out, args = tmp_path / "out", ("--max-shard-size", "300KB", "--no-progress")
    r = _cli("merge-lora", mxfp4_dir, adapter, out, *args, env={"GPTOSS_CONVERT_KILL_AT": "journal:2"})
    assert r.returncode == -9, r.stderr
    victim = adapter / "adapter_model.safetensors"
    original = bytearray(victim.read_bytes())
    changed = original.copy()
    changed[-100] ^= 1
    victim.write_bytes(bytes(changed))
    r = _cli("merge-lora", mxfp4_dir, adapter, out, *args, "--resume")
    assert r.returncode == 2 and not out.exists(), r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "splice" in line and "adapter/adapter_model.safetensors" in line and "without --resume" in line, line
    victim.write_bytes(bytes(original))
    r = _cli("merge-lora", mxfp4_dir, adapter, out, *args, "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    want = merged["mxfp4", "bf16", False, "triton"]
    files = sorted(p.name for p in out.iterdir() if p.name != "conversion.json")
    assert files == sorted(p.name for p in want.iterdir() if p.name != "conversion.json")
    assert all((out / f).read_bytes() == (want / f).read_bytes() for f in files)
    files = check(out, log=lambda *_: None)["source"]["files"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} < set(files)
    assert all(f.startswith(("adapter/", "base/model")) for f in files)


def test_qwen3_moe_attention_lora_equals_peft_and_fused_expert_targets_are_refused(tmp_path):
    """Qwen3-MoE (BF16, per-expert tensors): an attention LoRA merges to PEFT's merge, bit for
    bit after BF16 rounding, and with --to-orbax to to-orbax of that merge; a target_parameters
    LoRA on transformers' fused expert stack names tensors the checkpoint does not store, and is
    refused naming them."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeForCausalLM
    from family_cases import write_tiny_qwen3
    base = write_tiny_qwen3(tmp_path / "qwen3")
    model = get_peft_model(Qwen3MoeForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path / "a")
    ref = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    got, src = stored(merge_lora(base, tmp_path / "a", tmp_path / "o", **QUIET)), stored(base)
    assert sorted(got) == sorted(src)
    for n, arr in got.items():
        if n.endswith(("q_proj.weight", "v_proj.weight")):
            np.testing.assert_array_equal(arr.view(np.uint16), ref[n].astype(BF16).view(np.uint16), err_msg=n)
            assert arr.tobytes() != src[n].tobytes(), n
        else:
            assert arr.tobytes() == src[n].tobytes(), n
    from gptoss_convert.converters.to_orbax import to_orbax     # --to-orbax: to-orbax of that (PEFT's) merge
    direct = _orbax_leaves(merge_lora(base, tmp_path / "a", tmp_path / "o3", to_orbax=True, scanned=True, **QUIET))
    want = _orbax_leaves(to_orbax(tmp_path / "o", tmp_path / "o4", scanned=True, **QUIET))
    assert sorted(direct) == sorted(want) and all(direct[p].tobytes() == want[p].tobytes() for p in want)
    fused = get_peft_model(Qwen3MoeForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
    fused.save_pretrained(tmp_path / "f")
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.experts\.lora_A/B match no tensor"):
        merge_lora(base, tmp_path / "f", tmp_path / "o2", **QUIET)


def _same_output(out: Path, want: Path) -> None:
    """Every file but conversion.json byte-identical; the records agree on what was merged and lost."""
    files = sorted(p.name for p in out.iterdir() if p.name != "conversion.json")
    assert files == sorted(p.name for p in want.iterdir() if p.name != "conversion.json") and len(files) > 3
    assert all((out / f).read_bytes() == (want / f).read_bytes() for f in files)
    a, b = (json.loads((d / "conversion.json").read_text()) for d in (out, want))
    assert a["requantization"] == b["requantization"] and a["lora"]["tensors"] == b["lora"]["tensors"]


@pytest.mark.slow
def test_two_processes_write_the_single_process_merge(lora, mxfp4_dir, merged, tmp_path):
    """--distributed on two processes: one OUT, byte-identical to the single-process --mxfp4 merge."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_convert", "merge-lora", str(mxfp4_dir), str(lora[0]),
                               str(out), "--mxfp4", "--max-shard-size", "300KB", "--no-progress",
                               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--heartbeat-timeout", "5", "--distributed-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]           # (pipes drained while waiting)
    results = [(p.returncode, *o) for p, o in zip(procs, outputs)]
    assert all(rc == 0 for rc, _, _ in results), [err[-600:] for _, _, err in results]
    assert "process 1 of 2: wrote " in results[1][1] and " 0 of " not in results[1][1]
    _same_output(out, merged["mxfp4", "bf16", True, "triton"])


def test_bucket_out_reads_back_equal_to_the_local_merge(lora, mxfp4_dir, merged, gcs, tmp_path):
    """OUT on gs:// (the emulator): the same objects as the local merge, and `check` passes."""
    from gptoss_convert.io.location import resolve
    url = merge_lora(mxfp4_dir, lora[0], "gs://bkt/merge-lora/mx", mxfp4=True, max_shard_size="300KB", **QUIET)
    loc, want = resolve(str(url)), merged["mxfp4", "bf16", True, "triton"]
    local = tmp_path / "copy"
    local.mkdir()
    for k in loc.keys():
        (local / k).write_bytes((loc / k).read_bytes())
    _same_output(local, want)
    assert check(str(url), log=lambda *_: None)["command"] == "merge-lora"


def test_mxfp4_ties_follow_each_rule(lora, bf16_dir, tmp_path):
    """An adapter of dyadic weights (multiples of 1/16) on the tiny model's dyadic experts: the
    merged values are exact, and many fall exactly between two E2M1 values. transformers' decoder
    on each rule's output gives the re-derived rule (ties up for triton, to even for triton-rtne
    and ocp; compressed-tensors' own code for its rule) of the merged tensor, computed here exactly
    in numpy from the base and adapter."""
    d = _adapter_copy(lora, tmp_path)
    tensors = {k: np.round(v.astype(np.float32) * 16) / 16 for k, v in stored(d).items()}
    save_file(tensors, d / "adapter_model.safetensors")
    base = stored(bf16_dir)
    outs = {rule: stored(merge_lora(bf16_dir, d, tmp_path / rule, mxfp4=True, scale_rule=rule, **QUIET))
            for rule in ("triton", "triton-rtne", "ocp", "compressed-tensors")}
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    ties = 0
    for i in range(6):
        for p in ("gate_up_proj", "down_proj"):
            n = f"model.layers.{i}.mlp.experts.{p}"
            a = tensors[f"base_model.model.model.layers.{i}.mlp.experts{'.base_layer' if p == 'gate_up_proj' else ''}"
                        ".lora_A.weight"]
            b = tensors[f"base_model.model.model.layers.{i}.mlp.experts{'.base_layer' if p == 'gate_up_proj' else ''}"
                        ".lora_B.weight"]
            e = base[n].shape[0]
            w = base[n].astype(np.float64) + 2 * np.einsum("ore,eri->eio", b.reshape(b.shape[0], -1, e),
                                                           a.reshape(e, -1, a.shape[-1]))      # exact: dyadic
            for rule, got in outs.items():
                dec = convert_moe_packed_tensors(torch.from_numpy(got[n + "_blocks"]),
                                                 torch.from_numpy(got[n + "_scales"]), dtype=torch.float32).numpy()
                np.testing.assert_array_equal(dec, _rule_values(w.astype(np.float32), rule), err_msg=f"{rule} {n}")
            q = np.abs(_scaled(w.astype(np.float32), "triton")[0])
            ties += int(np.isin(q, (E2M1[1:] + E2M1[:-1]) / 2).sum())
    assert ties > 1000, ties          # the tie rules were exercised
    assert any(outs["triton"][k].tobytes() != outs["triton-rtne"][k].tobytes() for k in outs["triton"])


def test_cli_takes_every_converting_option_and_the_api_is_public():
    """merge-lora is spelled as every converting command is (test_protocol's set), and is
    gptoss_convert.merge_lora, documented."""
    import gptoss_convert
    from gptoss_convert.cli import main
    shared = {"--dtype", "--dry-run", "--overwrite", "--resume", "--workers", "--no-progress", "--quiet",
              "--allow-nonfinite", "--strict-config", "--no-space-check", "--json", "--s3-endpoint", "--distributed",
              "--coordinator-address", "--num-processes", "--process-id", "--mxfp4", "--scale-rule", "--scale",
              "--max-shard-size"}
    opts = {o for p in main.commands["merge-lora"].params for o in p.opts}
    assert shared <= opts, shared - opts

    def helps(cmd: str) -> dict:
        return {o: p.help for p in main.commands[cmd].params for o in p.opts}
    mine = helps("merge-lora")
    for cmd, same in (("to-hf", ["--step", "--item"]), ("to-orbax", ["--scanned", "--unscanned", "--zstd"])):
        assert all(mine[o] == helps(cmd)[o] and mine[o] for o in same), cmd      # the same options, same help
    assert gptoss_convert.merge_lora is merge_lora and "PEFT" in merge_lora.__doc__


def test_bf16_adapter_equals_peft_loading_it(lora, mxfp4_dir, bf16_dir, tmp_path):
    """An adapter saved in BF16 (as a BF16 training run saves it), read back by PEFT itself
    (PeftModel.from_pretrained on the fp32 base) and merged: our merge is PEFT's, bit for bit in BF16."""
    from peft import PeftModel
    from transformers import GptOssForCausalLM
    d = _adapter_copy(lora, tmp_path)
    save_file({k: v.astype(BF16) for k, v in stored(d).items()}, d / "adapter_model.safetensors", {"format": "pt"})
    peft = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32), d)
    ref = {k: v.numpy() for k, v in peft.merge_and_unload().state_dict().items()}
    got = stored(merge_lora(mxfp4_dir, d, tmp_path / "o", **QUIET))
    assert sorted(got) == sorted(ref)
    for n, arr in got.items():
        np.testing.assert_array_equal(arr.view(np.uint16), ref[n].astype(BF16).view(np.uint16), err_msg=n)


def test_an_expert_lora_laid_out_out_in_is_refused(lora, bf16_dir, tmp_path):
    """gate_up_proj's LoRA with A [r*E, 2I] and B [H, r*E] (what PEFT writes where GptOssExperts
    lacks is_transposed: in and out swapped) is refused, naming the tensor, not merged transposed."""
    d = _adapter_copy(lora, tmp_path)
    tensors = stored(d)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_"
    tensors[key + "A.weight"], tensors[key + "B.weight"] = np.ones((20, 192), np.float32), np.ones((64, 20), np.float32)
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"LoRA of model\.layers\.0\.mlp\.experts\.gate_up_proj is laid out "
                                         r"\[experts, out, in\]"):
        merge_lora(bf16_dir, d, tmp_path / "o", **QUIET)


def test_the_merge_runs_blas_on_one_thread_inside_its_own_workers(lora, bf16_dir, monkeypatch, tmp_path):
    """The blocks are the parallelism (job.run limits BLAS while the target writes): OpenBLAS's own
    threads spin-waited between merge-lora's small B @ A products, 25% of a merge's CPU samples
    (BENCHMARKS.md, "merge-lora at full size"). Outside the run BLAS keeps its threads."""
    from threadpoolctl import threadpool_info

    from gptoss_convert.converters import lora as lora_mod
    seen, product = [], lora_mod.LoraPair.product

    def recording(self, *args, **kwargs):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return product(self, *args, **kwargs)

    monkeypatch.setattr(lora_mod.LoraPair, "product", recording)
    before = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    out = merge_lora(bf16_dir, lora[0], tmp_path / "o", workers=2, **QUIET)
    assert len(seen) >= 6 * 6 and all(s == {1} for s in seen), seen      # every pair, once per row block
    assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == before
    got = stored(out)
    n = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[n].view(np.uint16), lora[1][n].astype(BF16).view(np.uint16))


# --- an Orbax BASE: PEFT's adapter attaches to to-hf's tensors (HF names) ---------------------------

@pytest.fixture(scope="module")
def orbax_bases(bf16_dir, tmp_path_factory):
    """{scanned: our to-orbax output of the tiny BF16 model, in fp32 (its weights exactly)}."""
    from gptoss_convert.converters.to_orbax import to_orbax
    root = tmp_path_factory.mktemp("orbax-base")
    return {s: to_orbax(bf16_dir, root / f"base-{s}", scanned=s, dtype="fp32", **QUIET) for s in (True, False)}


@pytest.mark.parametrize("scanned", [True, False])
def test_peft_adapter_into_an_orbax_base_equals_peft_merge_and_unload(orbax_bases, scanned, lora, tmp_path):
    """BASE = our to-orbax of the model PEFT trained on (scanned and unscanned): every merged
    tensor is PEFT's merge_and_unload() within fp32 rounding (measured: bit for bit), and
    transformers' fp32 logits of it are PEFT's merged model's (max |Δ| < 1e-4)."""
    from transformers import GptOssForCausalLM
    base = orbax_bases[scanned]
    out = merge_lora(base, lora[0], tmp_path / "merged", dtype="fp32", step=0, **QUIET)
    got, ref = stored(out), lora[1]
    assert sorted(got) == sorted(ref)
    for n, arr in got.items():
        assert arr.dtype == np.float32, n
        np.testing.assert_array_max_ulp(arr, ref[n], maxulp=1)
    record = json.loads((Path(out) / "conversion.json").read_text())
    assert record["command"] == "merge-lora" and len(record["lora"]["tensors"]) == 6 * 6
    assert {f.split("/")[0] for f in record["source"]["files"]} == {"base", "adapter"}     # resume compares both
    model = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
    delta = np.abs(_logits(model, TOKENS) - lora[2]).max()
    assert delta < 1e-4, delta
    check(out)


def test_peft_adapter_into_an_orbax_base_mxfp4_and_step(orbax_bases, lora, merged, tmp_path):
    """--mxfp4 from the Orbax base writes the bytes the HF base's merge writes (the merged fp32
    quantized by the same rule; that one is checked against a numpy re-derivation above); --step
    chooses within the Orbax BASE when the adapter is PEFT's, one line naming it when missing."""
    base = orbax_bases[True]
    got = merge_lora(base, lora[0], tmp_path / "o", mxfp4=True, scale_rule="ocp", **QUIET)
    a, b = stored(got), stored(merged["bf16", "bf16", True, "ocp"])
    assert sorted(a) == sorted(b) and any(n.endswith("_blocks") for n in a)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes(), n
    with pytest.raises(InputError, match=r"has no step 2 \(steps: \[0\]\); pick one with --step"):
        merge_lora(base, lora[0], tmp_path / "bad", step=2, **QUIET)
    assert not (tmp_path / "bad").exists()


# --- --to-orbax: the merged model as to-orbax writes it ----------------------------------------------

def _orbax_leaves(out: Path) -> dict[str, np.ndarray]:
    from gptoss_convert.io.orbax_source import open_orbax
    src = open_orbax(out)
    return {p: np.asarray(src.read(p, ())) for p in src.leaves}


@pytest.mark.parametrize("scanned", [True, False])
def test_to_orbax_equals_to_orbax_of_peft_merge_and_unload(lora, mxfp4_dir, scanned, tmp_path):
    """Oracle: to-orbax of PEFT's merge_and_unload() model (saved by transformers) = our
    `merge-lora --to-orbax` from the MXFP4 base, leaf for leaf (within 1 ulp; measured bit for
    bit); our JAX forward on it gives PEFT's merged logits (max |Δ| < 1e-4); check passes."""
    from gptoss_convert.converters.to_orbax import to_orbax
    from gptoss_convert.loading import load_config, load_params, locate
    from gptoss_convert.tree import unflatten
    import jax.numpy as jnp
    out = merge_lora(mxfp4_dir, lora[0], tmp_path / "ours", to_orbax=True, scanned=scanned, dtype="fp32", **QUIET)
    want = to_orbax(lora[3], tmp_path / "ref", scanned=scanned, dtype="fp32", **QUIET)
    got, ref = _orbax_leaves(out), _orbax_leaves(want)
    assert sorted(got) == sorted(ref) and len(got) > 10
    for p in ref:
        assert got[p].dtype == np.float32, p
        np.testing.assert_array_max_ulp(got[p], ref[p], maxulp=1)
    rec = check(out, log=lambda *_: None)
    assert rec["command"] == "merge-lora" and rec["maxtext_item"] == "0/items" and len(rec["lora"]["tensors"]) == 36
    assert rec["options"]["layout"] == ("scanned" if scanned else "unscanned") and rec["options"]["scale"] == 1.0
    ck = locate(out, None)
    backend, cfg = load_config(ck)
    flat, got_scanned = load_params(ck, dtype=np.float32)
    assert got_scanned == scanned
    ours = np.asarray(backend.forward(unflatten(flat), jnp.asarray(TOKENS), cfg, moe="ragged_dot", dtype=jnp.float32))
    delta = np.abs(ours - lora[2]).max()
    assert delta < 1e-4, delta


@pytest.mark.parametrize("scanned", [True, False])
def test_to_orbax_from_an_orbax_base_equals_to_orbax_of_peft_merge_and_unload(orbax_bases, lora, scanned, tmp_path):
    """BASE = our to-orbax output (each layout), OUT the other layout: to-hf's HF tensors of the
    base, the PEFT change added in fp32, mapped back as to-orbax maps; = to-orbax of PEFT's
    merge_and_unload() model, leaf for leaf (within 1 ulp; measured bit for bit)."""
    from gptoss_convert.converters.to_orbax import to_orbax
    out = merge_lora(orbax_bases[scanned], lora[0], tmp_path / "ours", to_orbax=True, scanned=not scanned,
                     dtype="fp32", **QUIET)
    want = to_orbax(lora[3], tmp_path / "ref", scanned=not scanned, dtype="fp32", **QUIET)
    got, ref = _orbax_leaves(out), _orbax_leaves(want)
    assert sorted(got) == sorted(ref)
    for p in ref:
        np.testing.assert_array_max_ulp(got[p], ref[p], maxulp=1)
    assert len(check(out, log=lambda *_: None)["lora"]["tensors"]) == 6 * 6


def test_to_orbax_dry_run_and_refusals(lora, bf16_dir, tmp_path):
    """--to-orbax --dry-run prints to-orbax's plan and writes nothing; --mxfp4 with it, a layout
    flag without it, no layout with it, HF output options given with it, and MaxText's --lora-rank
    with a PEFT adapter are refused
    in one line naming the option, nothing written (here from an Orbax BASE)."""
    lines: list[str] = []
    plan = merge_lora(bf16_dir, lora[0], tmp_path / "dry", to_orbax=True, scanned=False, dry_run=True,
                      progress=False, log=lines.append)
    assert plan.command == "merge-lora" and not (tmp_path / "dry").exists()
    assert any(line.startswith("needs: ") for line in "\n".join(lines).splitlines())
    from click.testing import CliRunner

    from gptoss_convert.cli import main
    from gptoss_convert.converters.to_orbax import to_orbax
    base = to_orbax(bf16_dir, tmp_path / "base", scanned=True, **QUIET)
    for args, msg in [(["--to-orbax", "--scanned", "--mxfp4"], "error: --mxfp4 with --to-orbax: an Orbax checkpoint"),
                      (["--unscanned"], "error: --unscanned: an Orbax layout option; merge-lora writes HF unless"),
                      (["--zstd"], "error: --zstd: an Orbax layout option"),
                      (["--to-orbax"], "Error: choose one layout: --scanned (training) or --unscanned (decoding)"),
                      (["--to-orbax", "--unscanned", "--max-shard-size", "1GB", "--scale-rule", "ocp"],
                       "Error: --max-shard-size and --scale-rule: for HF output; --to-orbax writes Orbax chunks"),
                      (["--to-orbax", "--unscanned", "--lora-rank", "4"], "error: " + str(lora[0]) + ": --lora-alpha"
                       "/--lora-rank are for MaxText LoRA checkpoints")]:
        r = CliRunner().invoke(main, ["merge-lora", str(base), str(lora[0]), str(tmp_path / "bad"), *args,
                                      "--no-progress"])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert len([x for x in r.output.splitlines() if x.strip().startswith(("error", "Error"))]) == 1, r.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_to_orbax_killed_then_resumed_is_the_uninterrupted_output(lora, bf16_dir, tmp_path):
    """--to-orbax resumes as to-orbax does (the source is BASE and ADAPTER): killed mid-write,
    --resume finishes it, every chunk byte-identical to an uninterrupted run; check passes.
    A resume with another --scale (the merge differs, the source bytes do not) starts over."""
    args = ("--to-orbax", "--unscanned", "--no-progress")
    r = _cli("merge-lora", bf16_dir, lora[0], tmp_path / "whole", *args)
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other"
    r = _cli("merge-lora", bf16_dir, lora[0], other, *args, env={"GPTOSS_CONVERT_KILL_AT": "write:20"})
    assert r.returncode == -9, r.stderr
    r = _cli("merge-lora", bf16_dir, lora[0], other, *args, "--resume", "--scale", "0.5")
    assert r.returncode == 0 and "made with other inputs or options; starting over" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "out"
    r = _cli("merge-lora", bf16_dir, lora[0], out, *args, env={"GPTOSS_CONVERT_KILL_AT": "write:20"})
    assert r.returncode == -9, r.stderr
    r = _cli("merge-lora", bf16_dir, lora[0], out, *args, "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert _orbax_files(out) == _orbax_files(tmp_path / "whole")
    assert check(out, log=lambda *_: None)["command"] == "merge-lora"


def _orbax_files(root: Path) -> dict[str, bytes]:
    """Every file of an Orbax output but those holding timestamps or paths, by relative path."""
    skip = {"_CHECKPOINT_METADATA", "conversion.json", "commit_success.txt"}
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in skip}
    assert len(files) > 20
    return files


def test_to_orbax_bucket_out_reads_back_equal_to_the_local_merge(lora, bf16_dir, gcs, tmp_path):
    """--to-orbax onto gs:// (the emulator): the same leaves as the local run, and `check` passes."""
    url = merge_lora(bf16_dir, lora[0], "gs://bkt/merge-lora/orbax", to_orbax=True, scanned=True, **QUIET)
    local = merge_lora(bf16_dir, lora[0], tmp_path / "local", to_orbax=True, scanned=True, **QUIET)
    got, want = _orbax_leaves(url), _orbax_leaves(local)
    assert sorted(got) == sorted(want) and all(got[p].tobytes() == want[p].tobytes() for p in want)
    assert check(str(url), log=lambda *_: None)["command"] == "merge-lora"


@pytest.mark.slow
def test_to_orbax_two_processes_write_the_single_process_merge(lora, bf16_dir, tmp_path):
    """--to-orbax --distributed on two processes: one OUT, its chunks byte-identical to one process's."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(bf16_dir), str(lora[0])]
    assert _cli("merge-lora", *args, tmp_path / "one", "--to-orbax", "--scanned", "--no-progress").returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_convert", "merge-lora", *args, str(tmp_path / "two"),
                               "--to-orbax", "--scanned", "--no-progress", "--coordinator-address", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout", "5",
                               "--distributed-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]           # (pipes drained while waiting)
    results = [(p.returncode, *o) for p, o in zip(procs, outputs)]
    assert all(rc == 0 for rc, _, _ in results), [err[-600:] for _, _, err in results]
    assert _orbax_files(tmp_path / "two") == _orbax_files(tmp_path / "one")
    assert check(tmp_path / "two", log=lambda *_: None)["command"] == "merge-lora"


def test_an_inf_in_the_adapter_is_refused_on_every_path_unless_allowed(lora, bf16_dir, orbax_bases, tmp_path):
    """An inf in one lora_B: HF and --to-orbax outputs, from an HF and an Orbax BASE, are refused
    naming the tensor and --allow-nonfinite, nothing written; with --allow-nonfinite they are written."""
    adapter = _adapter_copy(lora, tmp_path)
    tensors = stored(adapter)
    key = next(k for k in sorted(tensors) if "layers.1.self_attn.k_proj.lora_B" in k)
    tensors[key] = tensors[key].copy()
    tensors[key][2, 1] = np.inf
    save_file(tensors, adapter / "adapter_model.safetensors")
    runs = {"hf": (bf16_dir, {}), "hf-to-orbax": (bf16_dir, {"to_orbax": True, "scanned": True}),
            "orbax": (orbax_bases[True], {}),
            "orbax-to-orbax": (orbax_bases[True], {"to_orbax": True, "scanned": False})}
    for name, (base, kw) in runs.items():
        with pytest.raises(InputError, match=r"layers\.1\.self_attn\.k_proj\.weight.*NaN or inf.*--allow-nonfinite"):
            merge_lora(base, adapter, tmp_path / name, **kw, **QUIET)
        assert not (tmp_path / name).exists(), name
        merge_lora(base, adapter, tmp_path / name, allow_nonfinite=True, **kw, **QUIET)
        assert (tmp_path / name / "conversion.json").is_file(), name
