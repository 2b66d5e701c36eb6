#!/usr/bin/env bash
# Fine-tune gpt-oss-20b in MaxText and come back: HF MXFP4 for serving, unscanned Orbax for
# MaxText's decoding, each checked.
#
#   bash examples/finetune_and_return.sh [WORKDIR]
#
# Disk: ~14 GB download, ~42 GB for the scanned BF16 checkpoint, MaxText's training checkpoints
# (params + optimizer state), ~14 GB for the MXFP4 export, ~42 GB for the unscanned one.
# Memory stays at a few blocks (well under 3 GB) in every step.
set -euo pipefail
W=${1:-gpt-oss-20b-ft}
mkdir -p "$W"

# 1. The published MXFP4 release -> a scanned Orbax checkpoint MaxText trains from.
gptoss-convert to-orbax openai/gpt-oss-20b "$W/scanned" --scanned --resume

# 2. Train with MaxText (on your TPU/GPU machines); it writes Orbax training checkpoints
#    (params/params + opt_state + step, OCDBT + zarr3) under $W/run/checkpoints/<step>/items:
#      python3 -m MaxText.train MaxText/configs/base.yml model_name=gpt-oss-20b \
#          load_parameters_path=$W/scanned/0/items scan_layers=true \
#          base_output_directory=$W run_name=run enable_checkpointing=true ...
RUN="$W/run/checkpoints"
if [ ! -d "$RUN" ]; then
  echo "no MaxText run at $RUN yet: train first (step 2), then rerun this script" >&2
  exit 1
fi

# 3. Back to HF, MXFP4 in the published layout (latest committed step; --step N picks one).
#    MaxText's checkpoints carry no config.json: --like names the model they came from.
gptoss-convert to-hf "$RUN" "$W/hf-mxfp4" --mxfp4 --like openai/gpt-oss-20b --resume
#    (BF16 instead: drop --mxfp4.) The requantization error per tensor is printed and kept in
#    $W/hf-mxfp4/conversion.json under "requantization".

# 4. An unscanned params-only checkpoint for MaxText's decoding (optimizer state dropped).
gptoss-convert to-orbax "$RUN" "$W/unscanned" --unscanned --like openai/gpt-oss-20b --resume

# 5. Check both, and measure what MXFP4 costs: the fine-tune (Orbax) against its MXFP4 export
#    run by transformers (KL, max |Δlogit|, top-k agreement per prompt).
gptoss-convert check "$W/hf-mxfp4"
gptoss-convert check "$W/unscanned"
gptoss-convert verify "$W/unscanned" --hf "$W/hf-mxfp4" --moe ragged_dot --json "$W/mxfp4-vs-finetune.json" || true
#    (verify exits 4 when the thresholds are not met; here the report is what matters.)
echo "serve $W/hf-mxfp4 with vLLM or transformers; decode $W/unscanned with MaxText:"
echo "  load_parameters_path=$W/unscanned/0/items scan_layers=false"
