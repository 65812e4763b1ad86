#!/usr/bin/env bash
# Everything dsire does on a GPU, in one call on a lent GPU machine (a few minutes on one GPU):
#   1. the CUDA tests;  2. featurisation on CUDA beside the CPU, on the same synthetic SD 1.5 zoo;
#   3. FAISS indices (Flat, IVF with nprobe) on the GPU;  4. train.py trainer=gpu end to end;
#   5. the lab's ViT-B/16 recipe (benchmarks/vit_check.py: the membership audit on CUDA, then unlearning's
#      fit, forget and retrain, on timm's ViT-B/16 with random weights and digits upscaled into an image
#      folder: it checks the code path, not the accuracy of a real ViT).
# Figures go to $OUT/gpu_check.md (with each step's log beside it) and to benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# That machine has PyTorch but none of dsire's other requirements and no network: run
# `bash benchmarks/gpu_wheels.sh` here first and carry `.gpu_wheels` (the device tool's `carry`).
# With no CUDA device, or packages missing, it stops at once with one `error:` line and exit 2;
# a step that fails or overruns its time limit is reported and the next step runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.cache/gpu_check}
PYTHON=${PYTHON:-python3}
REPORT="$OUT/gpu_check.md"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1

fail() { echo "error: $1" >&2; exit 2; }

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || fail "CUDA: $PYTHON's torch sees no CUDA device; run this on the GPU machine"

if [ -d .gpu_wheels ]; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels .gpu_wheels/* \
    || fail ".gpu_wheels: pip could not install the carried wheels"
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["hydra", "omegaconf", "lightning", "safetensors", "peft", "diffusers", "faiss", "opacus", "sklearn", "kronfluence"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
[ -z "$missing" ] || fail "python packages: $missing missing; run bash benchmarks/gpu_wheels.sh where there is network and carry .gpu_wheels"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, add a row to the report
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local outcome="passed"
  [ $rc -eq 124 ] && outcome="**stopped at its ${limit} s limit**"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && outcome="**failed (exit $rc)**: $(tail -n 1 "$OUT/$name.log")"
  echo "| $name | $(( $(date +%s) - start )) | $outcome |" >>"$REPORT"
  echo "$name: $outcome"
}

{
  echo "# GPU check"
  echo
  echo "\`bash benchmarks/gpu_check.sh\` on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1),"
  echo "$("$PYTHON" -c 'import torch, faiss; print(f"torch {torch.__version__}, FAISS {faiss.__version__} with {faiss.get_num_gpus()} GPUs")')."
  echo
  echo "| step | seconds | outcome |"
  echo "| --- | ---: | --- |"
} >"$REPORT"

step cuda_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" tests/test_spectra.py
step featurise 180 "$PYTHON" -m benchmarks.featurise --loras 96 --paper-loras 4 --gpu
step faiss_gpu 120 "$PYTHON" -m benchmarks.index --sizes 1000 10000 100000 --gpu
step train_gpu 180 "$PYTHON" train.py trainer=gpu logger=csv "hydra.run.dir=$OUT/train_gpu" "paths.cache_dir=$OUT/cache"

if "$PYTHON" -c "import timm" 2>/dev/null; then
  step vit 600 "$PYTHON" -m benchmarks.vit_check --accelerator gpu --out "$OUT/vit" --private 64 --ensemble 10
else
  echo "| vit | 0 | **skipped**: timm (or its torchvision) does not import; gpu_wheels.sh carries timm |" >>"$REPORT"
fi

{
  echo
  for section in featurise_gpu index_gpu vit_gpu; do
    sed -n "/<!-- $section:begin -->/,/<!-- $section:end -->/p" benchmarks/README.md | sed '1d;$d'
    echo
  done
  metrics=$(find "$OUT/train_gpu" -name metrics.json 2>/dev/null | head -n 1)
  [ -n "$metrics" ] && echo "train.py trainer=gpu on the bundled zoo, summary: \`$("$PYTHON" -c \
    'import json, sys; print(json.load(open(sys.argv[1]))["summary"])' "$metrics")\`"
} >>"$REPORT"
cat "$REPORT"
