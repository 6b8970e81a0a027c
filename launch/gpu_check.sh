#!/usr/bin/env bash
# `make gpu-check`: the pipeline's checks on this machine's NVIDIA GPU(s), about 8 minutes;
# the logic and the list of checks are in launch/gpu_check.py. Arguments go to it, e.g.
#   bash launch/gpu_check.sh --only bench --budget-s 300
# PYTHON picks the interpreter (default: .venv/bin/python if its torch sees a GPU, else python3).
# Where deepspeed & co. do not import, the wheels of `make gpu-wheels` (GPU_WHEELS, default
# build/gpu-wheels) are installed without network into GPU_CHECK_SITE (default /tmp/gpu_check_site).
set -uo pipefail
cd "$(dirname "$0")/.."
unset DS_ACCELERATOR  # DeepSpeed must find CUDA by itself
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
MODULES="deepspeed, webdataset, fairscale, simplejpeg, braceexpand, hjson, pydantic, timm"

# The first candidate whose torch sees CUDA; else the first that imports torch (it explains); else python3.
choose_python() {
    local fallback="" p rc
    for p in .venv/bin/python python3; do
        command -v "$p" >/dev/null 2>&1 || continue
        "$p" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1
        rc=$?
        if [[ $rc == 0 ]]; then echo "$p"; return; fi
        if [[ $rc == 3 && -z $fallback ]]; then fallback=$p; fi
    done
    echo "${fallback:-python3}"
}

PYTHON=${PYTHON:-$(choose_python)}
"$PYTHON" -m launch.gpu_check preflight || exit $?

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import $MODULES" >/dev/null 2>&1; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu-check: $PYTHON cannot import one of $MODULES and $WHEELS holds no wheels;" \
             "run 'make gpu-wheels' where pip can reach an index and bring $WHEELS along" >&2
        exit 2
    fi
    echo "gpu-check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "gpu-check: installing the wheels from $WHEELS failed" >&2; exit 2; }
fi
exec "$PYTHON" -m launch.gpu_check run "$@"
