#!/usr/bin/env bash
# The laptop demo: digits -> shards -> 2-process DeepSpeed ZeRO-2 bf16 training of
# swin_debug -> export -> held-out top-1 of the export loaded in stock timm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
NPROC=${NPROC:-2}
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export DS_ACCELERATOR=cpu
fi
start=$(date +%s)

[ -d demo/images ] || "$PYTHON" -m pretrain.data.digits --out demo/images
[ -f demo/shards/dataset.json ] || "$PYTHON" -m pretrain.data.write_shards --src demo/images --out demo/shards --shard-samples 100

rm -rf runs/demo   # the demo always starts fresh; real runs resume instead
"$DEEPSPEED" --log_level warning --num_gpus "$NPROC" pretrain/main.py --config configs/demo.yaml "$@"
"$PYTHON" -m pretrain.export --run runs/demo --out runs/demo/export
"$PYTHON" -m pretrain.evaluate --model runs/demo/export --data demo/shards
echo "demo finished in $(( $(date +%s) - start ))s; TensorBoard: tensorboard --logdir runs/demo/tensorboard"
