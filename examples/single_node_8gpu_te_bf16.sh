#!/usr/bin/env bash
# One node, 8 GPUs, Transformer Engine, BF16: your usual Megatron-LM pretrain_gpt.py launch line,
# run through megatron_gate.run with one more flag (--gated-attention) and the monitor's config.
#
#   MEGATRON_LM=/workspace/Megatron-LM DATA=/data/corpus_text_document \
#   TOKENIZER=/models/tokenizer CKPT=/checkpoints/gpt-1b bash examples/single_node_8gpu_te_bf16.sh
set -euo pipefail
MEGATRON_LM=${MEGATRON_LM:?path of a Megatron-LM checkout}
DATA=${DATA:?prefix of a Megatron indexed dataset}
TOKENIZER=${TOKENIZER:?Hugging Face tokenizer path or name}
CKPT=${CKPT:?checkpoint directory}
EXAMPLES=$(cd "$(dirname "$0")" && pwd)
export CUDA_DEVICE_MAX_CONNECTIONS=1

MODEL=(--num-layers 24 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
       --group-query-attention --num-query-groups 4 --swiglu --normalization RMSNorm
       --position-embedding-type rope --seq-length 4096 --max-position-embeddings 4096
       --untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0
       --hidden-dropout 0)
TRAINING=(--micro-batch-size 2 --global-batch-size 256 --train-iters 100000
          --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
          --weight-decay 0.1 --clip-grad 1.0 --bf16)
PARALLEL=(--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
          --overlap-grad-reduce --overlap-param-gather --transformer-impl transformer_engine)
DATA_ARGS=(--data-path "$DATA" --split 990,8,2 --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$TOKENIZER")
OUTPUT=(--save "$CKPT" --load "$CKPT" --save-interval 1000 --log-interval 10
        --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$CKPT/tensorboard")

torchrun --nproc-per-node 8 -m megatron_gate.run "$MEGATRON_LM/pretrain_gpt.py" \
    "${MODEL[@]}" "${TRAINING[@]}" "${PARALLEL[@]}" "${DATA_ARGS[@]}" "${OUTPUT[@]}" \
    --gated-attention headwise --stability-config "$EXAMPLES/monitor.yaml" "$@"
