#!/usr/bin/env bash
# The one prepared GPU check (the checklist is shared/docs/gpu-check.md): run it once on a
# machine with a CUDA GPU, from the repository root, without installing the package:
#
#     OUT=/some/folder bash tools/gpu_check.sh          # everything goes to $OUT (log: $OUT/log)
#
# It prints and saves:
#   1. nvidia-smi -L, torch / CUDA / cuDNN versions, the GPU and its default TF32 settings;
#   2. the tests that need CUDA (pytest -m cuda; needs pytest);
#   3. tools/benchmark.py --device cuda on resnet56->resnet20 and resnet32x4->resnet8x4 for
#      NONE KD DKD REVIEWKD BLOCKKD, Block-KD last:2 and BLOCKKD.BATCH_STONES off, at batch 64
#      and 512, AMP off / bf16 / fp16, with and without --channels-last (JSON: $OUT/bench_*.json;
#      each table has ms/step, images/s, peak memory and the ratio to KD of the same run);
#   4. a synthetic run of 2 epochs through torchrun --nproc_per_node 1 with
#      EXPERIMENT.DETERMINISTIC True, then --resume to 3 epochs, compared bit for bit with an
#      uninterrupted 3-epoch run; then a 1-epoch vanilla resnet20 (the teacher) and one epoch
#      of Block-KD resnet20->resnet8 with SOLVER.AMP bf16, and whether its teacher ran
#      BN-folded under the GPU's default TF32 settings (teacher_folded in its metrics.jsonl).
# A step that fails is reported and the others still run; the exit status is 1 when any
# failed, 2 when the machine cannot run the check at all (no CUDA, missing packages).
#
# Packages: the GPU machine has torch, torchvision, timm, tqdm and matplotlib but no yacs,
# tensorboardX or pytest, and no package registry. Download their wheels here first:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl yacs tensorboardX pytest pluggy iniconfig
# and carry .whl to the machine: this script installs whatever .whl holds into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LOG_PREFIX="$OUT/runs"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        || { echo "error: cannot install the wheels in .whl into /tmp/site"; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

"$PY" - <<'PY' || exit 2
import importlib.util
import sys

missing = [m for m in ("torch", "yacs", "tensorboardX") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: gpu_check needs {', '.join(missing)}; put their wheels in .whl (see the top of tools/gpu_check.sh)")
import torch

if not torch.cuda.is_available():
    sys.exit(f"error: gpu_check needs a CUDA GPU, and torch {torch.__version__} sees none here "
             "(torch.cuda.is_available() is False); run it on the GPU machine")
PY

FAILED=()
step() {  # step NAME COMMAND...: run it, record a failure
    local name=$1
    shift
    echo
    echo "== $name =="
    "$@"
    local rc=$?
    if [ "$rc" -eq 0 ]; then echo "-- $name: ok"; else echo "-- $name: FAILED (exit $rc)"; FAILED+=("$name"); fi
}

versions() {
    nvidia-smi -L
    "$PY" - <<'PY'
import torch

b = torch.backends
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {b.cudnn.version()}, "
      f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}, "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
conv = getattr(b.cudnn, "conv", None)
if conv is not None and hasattr(conv, "fp32_precision"):
    print(f"default TF32 settings: cudnn.conv.fp32_precision={conv.fp32_precision}, "
          f"cuda.matmul.fp32_precision={b.cuda.matmul.fp32_precision}")
else:
    print(f"default TF32 settings: cudnn.allow_tf32={b.cudnn.allow_tf32}, cuda.matmul.allow_tf32={b.cuda.matmul.allow_tf32}")
PY
}

cuda_tests() {
    "$PY" -c "import pytest" 2>/dev/null || { echo "pytest is not importable: put its wheels in .whl"; return 1; }
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests -rs
}

benchmarks() {
    local rc=0 batch amp layout
    for batch in 64 512; do
        for amp in off bf16 fp16; do
            for layout in "" --channels-last; do
                echo "-- batch $batch, AMP $amp${layout:+, channels-last}"
                "$PY" -m mdistiller_blockkd benchmark --device cuda --pairs resnet56:resnet20 resnet32x4:resnet8x4 \
                    --distillers NONE KD DKD REVIEWKD BLOCKKD \
                    --variants BLOCKKD.STONES=last:2 BLOCKKD.BATCH_STONES=off \
                    --batch-size "$batch" --amp "$amp" $layout \
                    --json "$OUT/bench_b${batch}_${amp}${layout:+_cl}.json" || rc=1
            done
        done
    done
    return $rc
}

SYNTH=configs/synthetic/vanilla_resnet8.yaml
train() {  # train [torchrun] ARGS...: the train command, quiet, outputs under $OUT/runs
    local launch=("$PY" -m)
    if [ "$1" = torchrun ]; then
        launch=("$PY" -m torch.distributed.run --nproc_per_node 1 -m)
        shift
    fi
    "${launch[@]}" mdistiller_blockkd train "$@" LOG.PREFIX "$LOG_PREFIX" LOG.PROGRESS False
}

resume_run() {
    # world size 1: torchrun sets the variables; no process group (NCCL) starts with one process
    train torchrun --cfg "$SYNTH" EXPERIMENT.NAME resumed EXPERIMENT.DETERMINISTIC True SOLVER.EPOCHS 2 --overwrite &&
        train torchrun --cfg "$SYNTH" EXPERIMENT.NAME resumed EXPERIMENT.DETERMINISTIC True SOLVER.EPOCHS 3 --resume &&
        train torchrun --cfg "$SYNTH" EXPERIMENT.NAME whole EXPERIMENT.DETERMINISTIC True SOLVER.EPOCHS 3 --overwrite &&
        "$PY" - <<'PY'
import os

import torch

runs = os.path.join(os.environ["LOG_PREFIX"], "synthetic")
a, b = (torch.load(os.path.join(runs, name, "student_latest"), weights_only=True)["model"] for name in ("resumed", "whole"))
diff = max((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.is_floating_point())
print(f"resume on CUDA (EXPERIMENT.DETERMINISTIC True): 2 epochs + --resume to 3 vs 3 epochs: "
      f"{'bit-exact' if diff == 0 else f'NOT bit-exact, max |difference| {diff:.3g}'}")
PY
}

blockkd_run() {
    local teacher="$LOG_PREFIX/synthetic/teacher_resnet20/student_best"
    train --cfg "$SYNTH" EXPERIMENT.NAME teacher_resnet20 DISTILLER.STUDENT resnet20 SOLVER.EPOCHS 1 --overwrite &&
        train --cfg "$SYNTH" EXPERIMENT.NAME blockkd_bf16 DISTILLER.TYPE BLOCKKD DISTILLER.TEACHER resnet20 \
            DISTILLER.TEACHER_CKPT "$teacher" SOLVER.AMP bf16 SOLVER.EPOCHS 1 --overwrite &&
        "$PY" - <<'PY'
import json
import os
import sys

path = os.path.join(os.environ["LOG_PREFIX"], "synthetic", "blockkd_bf16", "metrics.jsonl")
record = [json.loads(line) for line in open(path) if line.strip()][-1]
folded = record.get("teacher_folded")
print(f"Block-KD resnet20->resnet8, bf16, 1 epoch on CUDA: test top-1 {record['test_acc']:.2f}, "
      f"{record['ms_per_step']:.1f} ms/step; teacher BN-folded under the default TF32 settings: {folded}")
sys.exit(0 if folded is True else 1)
PY
}

step "versions" versions
step "tests that need CUDA" cuda_tests
step "benchmarks" benchmarks
step "synthetic run through torchrun, resumed, compared with an uninterrupted run" resume_run
step "Block-KD, one epoch, bf16" blockkd_run

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: every step passed; outputs in $OUT"
else
    echo "gpu_check: FAILED steps: ${FAILED[*]}; see $OUT/log"
    exit 1
fi
