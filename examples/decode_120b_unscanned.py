"""gpt-oss-120b -> an unscanned MaxText checkpoint for decoding (fast per-layer access).

    python examples/decode_120b_unscanned.py /data/gpt-oss-120b-unscanned

The 120b release is ~65 GB of MXFP4; the bf16 checkpoint is ~234 GB on disk. The conversion
streams one expert at a time, so a 16 GB machine is enough. Interrupted? Run it again: `resume`
continues where it stopped, and the output only appears once complete.
"""

import sys

import gptoss_convert

out = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-120b-unscanned"
gptoss_convert.to_orbax("openai/gpt-oss-120b", out, scanned=False, dtype="bf16", resume=True)
print(f"""
Decode with MaxText, e.g.:
  python3 -m MaxText.decode MaxText/configs/base.yml model_name=gpt-oss-120b \\
      load_parameters_path={out}/0/items scan_layers=false ...
""")
