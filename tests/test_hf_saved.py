"""A checkpoint written by transformers' own `save_pretrained` (not by our generator) converts,
restores and runs identically: the oracle does not share our writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptoss_convert.backends.gpt_oss.model import forward
from gptoss_convert.backends.gpt_oss.params import flatten, unflatten
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.io.orbax_reader import load_params
from hf_reference import hf_to_maxtext

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory, tiny_cfg):
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(0)
    conf = GptOssConfig(**{k: v for k, v in tiny_cfg.to_hf_dict().items()
                           if k not in ("architectures", "experts_per_token", "model_type")})
    model = GptOssForCausalLM(conf).to(torch.bfloat16).eval()
    with torch.no_grad():                       # HF init leaves biases/sinks at 0: make them count
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name or "experts" in name:
                p.normal_(0, 0.05)
    d = tmp_path_factory.mktemp("hf") / "saved"
    model.save_pretrained(d)
    return d


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_save_pretrained_checkpoint_to_orbax_matches_hf(hf_saved, tiny_cfg, tmp_path, scanned):
    from transformers import GptOssForCausalLM
    ref_model = GptOssForCausalLM.from_pretrained(hf_saved, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
    sd = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    root = to_orbax(hf_saved, tmp_path / "o", scanned=scanned, dtype="fp32", **QUIET)
    got = flatten(load_params(root / "0"))
    ref = hf_to_maxtext(sd, tiny_cfg, scanned)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(got[k]), ref[k], err_msg=k)
    tokens = np.random.default_rng(0).integers(0, tiny_cfg.V, (2, 17))
    with torch.no_grad():
        want = ref_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(unflatten({k: np.asarray(v) for k, v in got.items()}), tokens.astype(np.int32), tiny_cfg))
    assert np.abs(ours - want).max() < 1e-4


def test_save_pretrained_checkpoint_dequantize_passthrough(hf_saved, tmp_path):
    from safetensors.torch import load_file
    out = dequantize(hf_saved, tmp_path / "d", **QUIET)
    a = {}
    for f in sorted(hf_saved.glob("*.safetensors")):
        a |= load_file(f)
    b = {}
    for f in sorted(out.glob("*.safetensors")):
        b |= load_file(f)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
