#!/usr/bin/env bash
# FP8 (Transformer Engine, hybrid E4M3/E5M2 recipe) on one node of 8 Hopper/Blackwell GPUs:
# the BF16 script plus the FP8 flags. Headwise gate rows are padded per query group to the
# 16-row alignment FP8 GEMMs need (the padding never reaches the output).
#
#   MEGATRON_LM=... DATA=... TOKENIZER=... CKPT=... bash examples/single_node_8gpu_fp8.sh
set -euo pipefail
exec bash "$(dirname "$0")/single_node_8gpu_te_bf16.sh" \
    --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max "$@"
