#!/usr/bin/env bash
# Verify a converted checkpoint against golden logits computed on a GPU machine.
#
# 1. On a machine with a GPU (HF transformers runs gpt-oss fast there), make the golden file:
#      gptoss-convert golden openai/gpt-oss-20b --out golden-20b.jsonl
#    (MaxText's three prompts plus a long passage crossing the sliding window; fp32 logits,
#    in MaxText's golden-file format, so files from MaxText's own logit checker work too.)
# 2. Copy golden-20b.jsonl next to the converted checkpoint, then on any machine:
set -euo pipefail
CKPT=${1:-gpt-oss-20b-scanned}
GOLDEN=${2:-golden-20b.jsonl}
gptoss-convert check "$CKPT"                      # the copy is intact (sha256 of every file)
gptoss-convert verify "$CKPT" --golden "$GOLDEN" --moe ragged_dot --json verify-report.json
# Thresholds default to the upstream 20b recipe (atol=rtol=0.1, max KL 3e-4);
# for 120b use: --atol 0.5 --rtol 0.5 --max-kl 3e-3
