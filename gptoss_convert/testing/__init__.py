"""Tiny gpt-oss checkpoints generated on the spot (tests, demo, benchmarks)."""

from gptoss_convert.testing.tiny import TINY, hf_tensors, tiny_config, write_checkpoint

__all__ = ["TINY", "hf_tensors", "tiny_config", "write_checkpoint"]
