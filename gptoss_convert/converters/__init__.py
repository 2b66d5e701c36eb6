"""Conversions: a checked plan of target blocks, streamed from an HF checkpoint to a writer."""
