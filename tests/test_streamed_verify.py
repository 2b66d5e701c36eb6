"""The streamed forward (layer by layer, only the routed experts read) equals the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_convert.backends.gpt_oss.model import forward
from gptoss_convert.backends.gpt_oss.params import flatten, unflatten
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.verify.streamed import streamed_logits


@pytest.mark.slow
@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_streamed_equals_in_memory(mxfp4_dir, tiny_cfg, tmp_path, scanned):
    root = to_orbax(mxfp4_dir, tmp_path / "o", scanned=scanned, dtype="fp32", progress=False, log=lambda *_: None)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, tiny_cfg.V, (3, 23)).astype(np.int32)      # 23 > sliding window 5
    mask = np.ones_like(tokens)
    mask[1, 15:] = 0                                                     # a right-padded row
    mask[2, 7:] = 0
    got = streamed_logits(root / "0", tiny_cfg, scanned, tokens, mask, vocab_block=128)   # 3 LM-head blocks
    params = unflatten({k: np.asarray(v) for k, v in flatten(load_params(root / "0")).items()})
    want = np.asarray(forward(params, tokens, tiny_cfg, attention_mask=mask))
    real = mask.astype(bool)
    assert [g.shape for g in got] == [(n, tiny_cfg.V) for n in real.sum(1)]   # real tokens only
    got, want = np.concatenate(got), want[real]
    err = np.abs(got - want).max()
    assert err <= 1e-6 * np.abs(want).max(), err
    assert (got.argmax(-1) == want.argmax(-1)).all()

