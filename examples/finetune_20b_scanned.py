"""gpt-oss-20b -> a scanned MaxText checkpoint for fine-tuning, straight from the MXFP4 release.

    python examples/finetune_20b_scanned.py /data/gpt-oss-20b-scanned

Needs ~13 GB of download (cached by huggingface_hub) and ~42 GB of disk for the bf16 output;
memory stays at a few blocks (well under 3 GB) whatever the model size.
"""

import sys

import gptoss_convert

out = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-20b-scanned"
gptoss_convert.to_orbax("openai/gpt-oss-20b", out, scanned=True, dtype="bf16", resume=True)
print(f"""
Fine-tune with MaxText, e.g.:
  python3 -m MaxText.train MaxText/configs/base.yml model_name=gpt-oss-20b \\
      load_parameters_path={out}/0/items scan_layers=true ...
""")
