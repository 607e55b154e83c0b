#!/usr/bin/env bash
# CPU smoke test (no GPU needed): Megatron-LM's own training loop with gated attention and the
# stability monitor on a 2-layer GPT with mock data. The same launch line as on a cluster, plus
# the CPU flags (gloo, local layers, no fused kernels). CI runs this one.
#
#   bash examples/cpu_smoke_test.sh                 # 1 process
#   NPROC=2 bash examples/cpu_smoke_test.sh --tensor-model-parallel-size 2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
OUT=${OUT:-$(mktemp -d -t megatron-gate-smoke.XXXXXX)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1

"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" \
    -m megatron_gate.run examples/pretrain_gpt_min.py \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --group-query-attention --num-query-groups 2 \
    --seq-length 32 --max-position-embeddings 32 --position-embedding-type rope \
    --micro-batch-size 2 --global-batch-size 4 --train-iters "${ITERS:-6}" \
    --lr 3e-3 --lr-decay-style constant --lr-decay-iters 100 \
    --attention-dropout 0 --hidden-dropout 0 \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 256 --split 1,0,0 \
    --eval-iters 0 --eval-interval 1000 --log-interval 1 \
    --distributed-backend gloo --transformer-impl local --no-persist-layer-norm \
    --no-gradient-accumulation-fusion --use-cpu-initialization --no-rope-fusion \
    --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion \
    --save "$OUT/checkpoints" --save-interval 3 --tensorboard-dir "$OUT/tensorboard" \
    --gated-attention headwise --stability-config examples/monitor_smoke.yaml \
    "$@"
echo "outputs: $OUT (stability.jsonl in $OUT/checkpoints/stability)"
