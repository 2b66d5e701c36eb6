"""Shared fixtures: tiny random gpt-oss checkpoints with all-distinct dimensions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gptoss_convert.testing import tiny_config, write_checkpoint  # noqa: E402
from stores_fixtures import env_vars, gcs, local_out, remote_outs, s3  # noqa: E402,F401  (object-store emulators)


def run_env() -> dict[str, str]:
    """Environment for subprocesses running `python -m gptoss_convert` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def mxfp4_dir(tmp_path_factory, tiny_cfg):
    """A tiny MXFP4 checkpoint in the published layout (2 shards + index, tokenizer)."""
    return write_checkpoint(tmp_path_factory.mktemp("src") / "mxfp4", tiny_cfg, fmt="mxfp4", seed=0)


@pytest.fixture(scope="session")
def bf16_dir(tmp_path_factory, tiny_cfg):
    """The same model as `mxfp4_dir`, with expert weights dequantized (BF16, HF orientation)."""
    return write_checkpoint(tmp_path_factory.mktemp("src") / "bf16", tiny_cfg, fmt="bf16", seed=0)
