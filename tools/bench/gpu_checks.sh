#!/usr/bin/env bash
# Issue 4's GPU checks in one go, for a lent H100 / H200 (BENCHMARKS.md, "GPU"):
#   1. the CUDA-only tests (bf16 attention paths against a float64 reference);
#   2. tools/bench/model.py for the 30M model, eager, realistic and full-length views: packed vs padded
#      tokens/s, cells/s, MFU;
#   3. the same with --compile (the packed path's blocks compiled as model.training.compile=true does;
#      the padded baseline stays eager);
#   4. a short concept-train run of the 30M model in bf16 (metrics.jsonl with MFU, a checkpoint),
#      then a resume from that checkpoint.
# Usage: bash tools/bench/gpu_checks.sh PROJECT_PATH OUT_DIR [key=value ...]
# PROJECT_PATH must be sharded; extra overrides go to every step (e.g. datamodule.check_sources=false
# when only the shards were copied to the GPU machine). Each step has its own time limit, so one that
# fails or hangs does not cost the others; all output is also written under OUT_DIR.
set -uo pipefail
USAGE="usage: bash tools/bench/gpu_checks.sh PROJECT_PATH OUT_DIR [key=value ...]"
[ $# -ge 2 ] || { echo "$USAGE" >&2; exit 2; }
PROJECT=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
FAILED=""

step() {   # step NAME SECONDS CMD...: run CMD with a time limit into OUT/NAME.txt, then show its last lines
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.txt"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
}

nvidia-smi -L
$PY -c "import torch, streaming, hydra; print('torch', torch.__version__, torch.cuda.get_device_name(), 'streaming', streaming.__version__)" || exit 1
step cuda_tests 90 $PY -m pytest -q -p no:cacheprovider tests/train/model/test_model.py -k cuda
step bench_eager 200 $PY tools/bench/model.py "$PROJECT" --device cuda --configs 30m --cases realistic,full --profile "$@"
step bench_compile 180 $PY tools/bench/model.py "$PROJECT" --device cuda --configs 30m --cases realistic,full --batches 10 --repeats 2 --compile --profile "$@"
RUNS=$(mktemp -d)
TRAIN=(model=ContrastiveModel "PATH.CHECKPOINT_ROOT=$RUNS" initialize.run_id=gpu datamodule.dataloader.train.batch_size=128
       datamodule.dataloader.train.num_workers=4 model.training.log_every_n_steps=10 model.training.checkpoint_every_n_steps=40
       model.training.val_check_interval=0 model.training.validate_before_training=False "$@")
step train 120 $PY -c 'import sys; from concept_train.cli import main; sys.exit(main(sys.argv[1:]))' "$PROJECT" "${TRAIN[@]}" model.training.max_steps=80
step resume 90 $PY -c 'import sys; from concept_train.cli import main; sys.exit(main(sys.argv[1:]))' "$PROJECT" "${TRAIN[@]}" model.training.max_steps=100 initialize.resume=True
cp "$RUNS"/gpu/metrics.jsonl "$OUT"/ 2>/dev/null || true
[ -z "$FAILED" ] || { echo "failed steps:$FAILED"; exit 1; }
