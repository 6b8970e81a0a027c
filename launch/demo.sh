#!/usr/bin/env bash
# The laptop demo, supervised (default) or SimMIM:
#   launch/demo.sh [supervised|simmim] [--set section.key=value ...]
# digits -> shards -> 2-process DeepSpeed ZeRO-2 bf16 training of swin_debug -> export ->
# supervised: held-out top-1 of the timm and the transformers exports (the same model: equal);
# simmim: reconstruction pictures under runs/demo_simmim/images/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
NPROC=${NPROC:-2}
OBJECTIVE=supervised
if [[ $# -gt 0 && $1 != --* ]]; then OBJECTIVE=$1; shift; fi
case $OBJECTIVE in
    supervised) CONFIG=configs/demo.yaml; RUN=runs/demo ;;
    simmim) CONFIG=configs/demo_simmim.yaml; RUN=runs/demo_simmim ;;
    *) echo "error: unknown objective '$OBJECTIVE' (use supervised or simmim)" >&2; exit 2 ;;
esac
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export DS_ACCELERATOR=cpu
fi
start=$(date +%s)

[ -d demo/images ] || "$PYTHON" -m pretrain.data.digits --out demo/images
[ -f demo/shards/dataset.json ] || "$PYTHON" -m pretrain.data.write_shards --src demo/images --out demo/shards --shard-samples 100

rm -rf "$RUN"   # the demo always starts fresh; real runs resume instead
"$DEEPSPEED" --log_level warning --num_gpus "$NPROC" pretrain/main.py --config "$CONFIG" "$@"
"$PYTHON" -m pretrain.export --run "$RUN" --out "$RUN/export" --format timm hf official
if [[ $OBJECTIVE == supervised ]]; then
    "$PYTHON" -m pretrain.evaluate --model "$RUN/export/timm" --data demo/shards
    "$PYTHON" -m pretrain.evaluate --model "$RUN/export/hf" --data demo/shards
else
    echo "reconstructions (input | masked | reconstruction): $(ls "$RUN"/images/*.png | tail -1)"
fi
echo "demo finished in $(( $(date +%s) - start ))s; TensorBoard: tensorboard --logdir $RUN/tensorboard"
