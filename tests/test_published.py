"""The published gpt-oss config.json files, verbatim, through every command; the config policy
(math fields checked, inert and unknown fields accepted, duplicate spellings agree); and the
derivatives users bring: a BF16 re-upload, a fine-tune saved by transformers 5, and the same in
transformers-4.55 spelling — each through dequantize, to-orbax, golden and verify against HF."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_env
from gptoss_convert.backends.gpt_oss.config import config_from_dict
from gptoss_convert.backends.gpt_oss.params import abstract_params, flatten
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import ConfigError
from gptoss_convert.testing.published import PUBLISHED, published_config
from gptoss_convert.testing.tiny import TINY_TOKENS, tiny_raw_config, write_checkpoint, write_sparse_checkpoint
from gptoss_convert.testing.tokenizer import write_tokenizer
from gptoss_convert.verify.golden import golden
from gptoss_convert.verify.verify import verify

QUIET = dict(progress=False, log=lambda *_: None)
# The published sizes, from the model cards: 20b has 24 layers and 32 experts, 120b 36 and 128.
REAL = {"gpt-oss-20b": dict(L=24, E=32, shards=3, params=20.9e9),
        "gpt-oss-120b": dict(L=36, E=128, shards=15, params=116.8e9)}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True,
                          env=run_env(), timeout=600)


# ---- the published configs, verbatim --------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_is_read_whole(name):
    raw = published_config(name)
    assert "initial_context_length" in raw and "quantization_config" in raw    # the fields that were refused
    cfg = config_from_dict(raw)
    assert (cfg.L, cfg.E, cfg.H, cfg.I, cfg.V) == (REAL[name]["L"], REAL[name]["E"], 2880, 2880, 201088)
    assert (cfg.Nq, cfg.Nkv, cfg.D, cfg.num_experts_per_tok, cfg.sliding_window) == (64, 8, 64, 4, 128)
    assert cfg.rope_theta == 150000 and cfg.rope_scaling.truncate is False and cfg.rope_scaling.factor == 32
    assert cfg.unknown_fields == ()                       # every published field is known (read or inert)
    assert config_from_dict(raw, strict=True) == cfg


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_real_shape_tree(name, scanned):
    import jax
    cfg = config_from_dict(published_config(name))
    tree = abstract_params(cfg, scanned=scanned)
    flat = flatten(tree)
    L, E = REAL[name]["L"], REAL[name]["E"]
    assert len(flat) == (41 if scanned else 3 + 19 * L)
    wi_0 = flat["decoder/layers/layers_0/GptOssMlp/wi_0" if scanned else "decoder/layers_3/GptOssMlp/wi_0"]
    assert wi_0.shape == ((E, L // 2, 2880, 2880) if scanned else (E, 2880, 2880))
    out = jax.eval_shape(lambda t: jax.tree.map(lambda x: x.sum(), t), tree)   # shapes only
    assert all(o.shape == () for o in jax.tree.leaves(out))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    assert abs(params / REAL[name]["params"] - 1) < 0.01


@pytest.mark.parametrize("name", PUBLISHED)
def test_dry_run_plans_real_shape_shards(name, tmp_path):
    """Real-shape shards (real headers, holes for data) give to-orbax --dry-run the real plan."""
    raw = published_config(name)
    src = write_sparse_checkpoint(tmp_path / name, raw, shards=REAL[name]["shards"])
    assert (sorted(p.name for p in src.glob("*.safetensors"))[0]
            == f"model-00000-of-{REAL[name]['shards'] - 1:05d}.safetensors")
    assert sum(p.stat().st_blocks for p in src.glob("*.safetensors")) * 512 < 64 << 20    # holes, not data
    r = cli("to-orbax", str(src), str(tmp_path / "out"), "--scanned", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    assert not (tmp_path / "out").exists()
    tree = abstract_params(config_from_dict(raw), scanned=True)
    want = sum(math.prod(x.shape) for x in flatten(tree).values()) * 2            # bf16
    assert "41 target leaves" in r.stdout and f"{want:,} bytes to write" in r.stdout


# ---- the config policy -----------------------------------------------------------------------


def _refused(raw: dict, *needles: str, strict: bool = False) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "config.json", strict=strict)
    msg = e.value.one_line()
    assert all(n in msg for n in needles), msg
    return msg


MATH_CHANGING = [
    ("attention_bias", False, "attention_bias=False is not supported"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope type 'linear' is not supported"),
    ("layer_types", ["sliding_attention", "chunked_attention"] * 12,
     "layer_types[1]='chunked_attention' is not a supported layer type"),
    ("quantization_config", {"quant_method": "fp8"}, "quant_method='fp8' is not supported (supported: mxfp4)"),
]


@pytest.mark.parametrize("field, value, needle", MATH_CHANGING, ids=[m[0] for m in MATH_CHANGING])
def test_math_changing_value_is_refused(field, value, needle):
    _refused(published_config("gpt-oss-20b") | {field: value}, needle)


def test_wrong_types_name_the_field():
    raw = published_config("gpt-oss-20b")
    _refused(raw | {"sliding_window": "128"}, "sliding_window must be an integer, got '128'")
    _refused(raw | {"rms_norm_eps": None, "swiglu_limit": "7"}, "swiglu_limit must be a finite number, got '7'")
    _refused(raw | {"rope_scaling": dict(raw["rope_scaling"], truncate="no")}, "truncate must be true or false")


SYNONYMS = [
    (dict(num_experts_per_tok=4, experts_per_token=2), "num_experts_per_tok=4 and experts_per_token=2 disagree"),
    (dict(torch_dtype="bfloat16", dtype="float32"), "torch_dtype='bfloat16' and dtype='float32' disagree"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 16.0}),
     "rope_scaling.factor=32.0 and rope_parameters.factor=16.0 disagree"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000}),
     "rope_theta=150000 and rope_parameters.rope_theta=10000 disagree"),
]


@pytest.mark.parametrize("fields, needle", SYNONYMS, ids=["experts", "dtype", "rope-factor", "rope-theta"])
def test_disagreeing_spellings_name_both(fields, needle):
    _refused(published_config("gpt-oss-20b") | fields, needle)


def test_agreeing_spellings_are_one_quantity():
    raw = published_config("gpt-oss-20b")
    both = raw | {"torch_dtype": "bfloat16", "dtype": "bfloat16",
                  "rope_parameters": dict(raw["rope_scaling"], rope_theta=150000.0)}
    assert config_from_dict(both) == config_from_dict(raw)


def test_unknown_fields_are_accepted_and_named():
    raw = published_config("gpt-oss-20b") | {"unsloth_fixed": True, "my_flag": {"a": 1}}
    assert config_from_dict(raw).unknown_fields == ("my_flag", "unsloth_fixed")
    _refused(raw, "unknown fields ['my_flag', 'unsloth_fixed']", "--strict-config", strict=True)


# ---- the CLI on bad and unknown config fields -----------------------------------------------


@pytest.fixture(scope="module")
def src_with(tmp_path_factory, mxfp4_dir):
    """A copy of the tiny published-layout MXFP4 checkpoint with config.json fields changed."""
    def make(**fields) -> Path:
        d = tmp_path_factory.mktemp("cfg") / "src"
        shutil.copytree(mxfp4_dir, d)
        conf = json.loads((d / "config.json").read_text()) | fields
        (d / "config.json").write_text(json.dumps(conf))
        return d
    return make


@pytest.mark.parametrize("command", ["dequantize", "to-orbax"])
def test_cli_refuses_math_change_in_one_line_writing_nothing(src_with, tmp_path, command):
    src = src_with(attention_bias=False)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    r = cli(command, str(src), str(tmp_path / "out"), "--no-progress",
            *(["--unscanned"] if command == "to-orbax" else []))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {src / 'config.json'}: "
                                     "attention_bias=False is not supported (gpt-oss has True)"]
    assert list(tmp_path.iterdir()) == []                                         # nothing written, no partial
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before   # input untouched


def test_cli_unknown_field_warns_once_records_and_converts(src_with, tmp_path):
    src = src_with(unsloth_fixed=True)
    r = cli("to-orbax", str(src), str(tmp_path / "out"), "--unscanned", "--no-progress")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "unknown fields" in line]
    assert warnings == [f"warning: {src / 'config.json'}: unknown fields ['unsloth_fixed'] accepted as inert "
                        "(recorded in conversion.json; --strict-config refuses them)"]
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["config_unknown_fields"] == ["unsloth_fixed"]
    r = cli("check", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    r = cli("dequantize", str(src), str(tmp_path / "deq"), "--no-progress", "--strict-config")
    assert r.returncode == 2 and "unknown fields ['unsloth_fixed']" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "deq").exists()


def test_published_config_converts_without_warning(mxfp4_dir, tmp_path):
    """The tiny fixture's config.json is the published one with sizes (and token ids) changed."""
    conf = json.loads((mxfp4_dir / "config.json").read_text())
    pub = published_config("gpt-oss-20b")
    changed = {k for k in pub if conf.get(k) != pub[k]}
    assert conf.keys() == pub.keys()
    assert changed == {*tiny_raw_config().keys() - pub.keys(), "vocab_size", "hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "experts_per_token",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "layer_types",
                       *TINY_TOKENS}
    r = cli("dequantize", str(mxfp4_dir), str(tmp_path / "deq"), "--no-progress", "--strict-config")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_fixture_laid_out_as_published(mxfp4_dir):
    names = sorted(p.name for p in mxfp4_dir.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "metal",
                     "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json", "original",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


# ---- derivatives: BF16 re-upload, transformers-5 fine-tune, transformers-4.55 spelling -------


def _finetune_t5(d: Path, tiny_cfg) -> Path:
    """A fine-tune as transformers 5 saves it: weights moved away from the base model, saved by
    `save_pretrained` (config with `dtype` and `rope_parameters`, experts as BF16 parameters)."""
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(1)
    conf = GptOssConfig(**{k: v for k, v in tiny_raw_config().items() if k != "quantization_config"})
    model = GptOssForCausalLM(conf).to(torch.bfloat16).eval()
    with torch.no_grad():                       # HF init leaves biases/sinks at 0: make them count
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name or "experts" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(d)
    write_tokenizer(d, tiny_cfg.V)
    saved = json.loads((d / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and "rope_parameters" in saved and "rope_scaling" not in saved
    return d


def _spelled_455(src: Path, d: Path) -> Path:
    """The same fine-tune in transformers-4.55 spelling: `torch_dtype`, `rope_scaling` + `rope_theta`."""
    shutil.copytree(src, d)
    conf = json.loads((d / "config.json").read_text())
    rope = conf.pop("rope_parameters")
    conf |= {"torch_dtype": conf.pop("dtype"), "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope,
             "transformers_version": "4.55.0"}
    (d / "config.json").write_text(json.dumps(conf, indent=2))
    return d


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("derivatives")
    reupload = write_checkpoint(root / "bf16-reupload", tiny_cfg, fmt="bf16", seed=3,
                                config_updates={"unsloth_fixed": True})          # a re-uploading tool's own flag
    t5 = _finetune_t5(root / "finetune-t5", tiny_cfg)
    return {"bf16-reupload": reupload, "finetune-t5": t5, "finetune-t4.55": _spelled_455(t5, root / "finetune-t455")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16-reupload", "finetune-t5", "finetune-t4.55"])
def test_derivative_converts_and_verifies(derivatives, kind, tmp_path):
    src = derivatives[kind]
    conf = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in conf
    gold = golden(src, tmp_path / "golden.jsonl", prompts="I love to;Today is a;What is the", log=lambda *_: None)
    outs = {"dequantized": dequantize(src, tmp_path / "deq", **QUIET)}
    outs |= {layout: to_orbax(src, tmp_path / layout, scanned=layout == "scanned", dtype="fp32", **QUIET)
             for layout in ("scanned", "unscanned")}
    for what, out in outs.items():
        report = verify(out, golden=gold, moe="ragged_dot", log=lambda *_: None)
        rows = report["prompts"]
        assert report["pass"], (kind, what)
        assert max(r["max_abs_diff"] for r in rows) < 1e-4 and max(r["max_kl"] for r in rows) < 1e-6, (kind, what)
        record = json.loads((out / "conversion.json").read_text())
        assert record["config_unknown_fields"] == (["unsloth_fixed"] if kind == "bf16-reupload" else [])
    from safetensors.torch import load_file
    src_t = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    deq_t = {k: v for f in sorted(outs["dequantized"].glob("*.safetensors")) for k, v in load_file(f).items()}
    assert src_t.keys() == deq_t.keys() and all(torch.equal(src_t[k], deq_t[k]) for k in src_t)   # BF16 copied
