#!/usr/bin/env bash
# The one prepared GPU check (the checklist is shared/docs/gpu-check.md): run it once on a
# machine with a CUDA GPU, from the repository root, without installing the package:
#
#     OUT=/some/folder bash tools/gpu_check.sh          # everything goes to $OUT (log: $OUT/log)
#
# It prints and saves, in this order (the short correctness checks first):
#   1. nvidia-smi -L, torch / CUDA / cuDNN versions, the GPU and its default TF32 settings;
#   2. a synthetic run of 2 epochs through torchrun --nproc_per_node 1 with
#      EXPERIMENT.DETERMINISTIC True, then --resume to 3 epochs, compared bit for bit with an
#      uninterrupted 3-epoch run; then a 1-epoch vanilla resnet20 (the teacher) and one epoch
#      of Block-KD resnet20->resnet8 with SOLVER.AMP bf16, and whether its teacher ran
#      BN-folded under the GPU's default TF32 settings (teacher_folded in its metrics.jsonl);
#   3. the tests that need CUDA (pytest -m cuda; needs pytest);
#   4. the benchmark (--device cuda) on resnet56->resnet20 and resnet32x4->resnet8x4 for
#      NONE KD DKD REVIEWKD BLOCKKD, Block-KD last:2 and BLOCKKD.BATCH_STONES off, at batch 64
#      and 512, AMP off / bf16 / fp16 (entries of one process), with and without
#      --channels-last (JSON: $OUT/bench_b<batch>[_cl].json; each table has ms/step, images/s,
#      peak memory and the ratio to KD at the same precision and layout);
#   5. the transformer pairs: BERT-base (random weights from a config.json) -> 6 layers at
#      32 x 128 tokens, and DeiT-S -> DeiT-Ti at 128 x 224 px, NONE KD DKD LSKD BLOCKKD and
#      last:2, fp32 and bf16 ($OUT/bench_bert_base.json, $OUT/bench_deit.json).
# Training runs go under $LOG_PREFIX (default $OUT/runs). On one H200 the whole script takes
# about 8.5 minutes (the benchmarks most of it): give the call 10.
# A step that fails is reported and the others still run; the exit status is 1 when any
# failed, 2 when the machine cannot run the check at all (no CUDA, missing packages).
#
# Packages: the GPU machine has torch, torchvision, timm, tqdm, matplotlib (and pytest,
# transformers for step 5) but no yacs or tensorboardX, and no package registry. Download
# their wheels here first:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl yacs tensorboardX
# and carry .whl to the machine: this script installs whatever .whl holds into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LOG_PREFIX=${LOG_PREFIX:-$OUT/runs}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl \
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
    # one process per batch size and layout; the precisions and Block-KD variants are entries of
    # it, so every ratio to KD is KD's at the same precision and layout in the same process
    local rc=0 batch layout v variants=(SOLVER.AMP=bf16 SOLVER.AMP=fp16)
    for v in BLOCKKD.STONES=last:2 BLOCKKD.BATCH_STONES=off; do
        variants+=("$v" "$v,SOLVER.AMP=bf16" "$v,SOLVER.AMP=fp16")
    done
    for batch in 64 512; do
        for layout in "" --channels-last; do
            echo "-- batch $batch, AMP off / bf16 / fp16${layout:+, channels-last}"
            "$PY" -m mdistiller_blockkd benchmark --device cuda --pairs resnet56:resnet20 resnet32x4:resnet8x4 \
                --distillers NONE KD DKD REVIEWKD BLOCKKD --variants "${variants[@]}" \
                --batch-size "$batch" $layout --json "$OUT/bench_b${batch}${layout:+_cl}.json" || rc=1
        done
    done
    return $rc
}

transformer_benchmarks() {
    # BERT-base (12 layers, hidden 768, random weights from a config.json) -> its 6-layer twin at
    # 128 tokens (3 blocks each), and DeiT-S -> DeiT-Ti at 224 px (4 blocks each); fp32 and bf16
    local rc=0 bert=/tmp/gpu_check_bert_base
    mkdir -p "$bert" && "$PY" - "$bert" <<'PY' || return 1
import json
import sys

json.dump({"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
           "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
           "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0},
          open(sys.argv[1] + "/config.json", "w"))
PY
    local common=(--device cuda --distillers NONE KD DKD LSKD BLOCKKD
                  --variants BLOCKKD.STONES=last:2 SOLVER.AMP=bf16 BLOCKKD.STONES=last:2,SOLVER.AMP=bf16)
    echo "-- BERT-base -> 6 layers, batch 32 x 128 tokens, 2 classes"
    "$PY" -m mdistiller_blockkd benchmark "${common[@]}" \
        --pairs "hf:$bert,init=random,blocks=3:hf:$bert,init=random,layers=6,blocks=3" \
        --batch-size 32 --seq-len 128 --num-classes 2 --json "$OUT/bench_bert_base.json" BLOCKKD.CONNECTOR linear_ln || rc=1
    echo "-- DeiT-S -> DeiT-Ti, batch 128 x 224 px, 1000 classes"
    "$PY" -m mdistiller_blockkd benchmark "${common[@]}" \
        --pairs "timm:deit_small_patch16_224,blocks=4:timm:deit_tiny_patch16_224,blocks=4" \
        --batch-size 128 --image-size 224 --num-classes 1000 --json "$OUT/bench_deit.json" BLOCKKD.CONNECTOR linear_ln || rc=1
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

# the short correctness checks first, the long benchmarks last
step "versions" versions
step "synthetic run through torchrun, resumed, compared with an uninterrupted run" resume_run
step "Block-KD, one epoch, bf16" blockkd_run
step "tests that need CUDA" cuda_tests
step "benchmarks" benchmarks
step "transformer benchmarks" transformer_benchmarks

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: every step passed; outputs in $OUT"
else
    echo "gpu_check: FAILED steps: ${FAILED[*]}; see $OUT/log"
    exit 1
fi
