"""MaxText's own model restores this project's relayout of the training checkpoint beside this
file, in both layouts, and reproduces MaxText's logits (logits.npz).

Run with MaxText's venv (README.md here), from the repository root:

    mkdir -p /tmp/rl && .venv/bin/python -m gptoss_convert to-orbax tests/data/maxtext_train/checkpoints /tmp/rl/unscanned \\
        --unscanned --dtype fp32 --like tests/data/maxtext_train
    .venv/bin/python -m gptoss_convert to-orbax /tmp/rl/unscanned /tmp/rl/scanned --scanned --dtype fp32
    PYTHONPATH=tests/data/maxtext_train /work/mt-venv/bin/python tests/data/maxtext_train/check_relayout.py /tmp/rl

(the second conversion relays the unscanned one back out: a round trip through both layouts).
Prints max |Δ| per layout against logits.npz and exits non-zero above 1e-4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import make_checkpoint as mk

HERE = Path(__file__).parent


def main(root: Path) -> int:
    raw = json.loads((HERE / "config.json").read_text())
    ref = np.load(HERE / "logits.npz")
    worst = 0.0
    for layout, scan in (("unscanned", "false"), ("scanned", "true")):
        runtime = [a for a in mk.RUNTIME if not a.startswith("scan_layers=")] + [f"scan_layers={scan}"]
        mk.RUNTIME[:] = runtime
        got = mk.maxtext_logits(root / layout / "0", mk.model_overrides(raw), ref["tokens"])
        delta = float(np.abs(got - ref["logits"]).max())
        worst = max(worst, delta)
        print(f"{layout}: MaxText restored {root / layout / '0' / 'items'}; max |Δ| vs logits.npz = {delta:.3g}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
