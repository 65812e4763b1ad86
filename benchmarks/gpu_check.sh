#!/usr/bin/env bash
# Everything dsire does on a GPU, in one call on a lent GPU machine (a few minutes on one GPU):
#   1. the CUDA tests;  2. featurisation on CUDA beside the CPU, on the same synthetic SD 1.5 zoo;
#   3. FAISS indices (Flat, IVF with nprobe) on the GPU;  4. train.py trainer=gpu end to end;
#   5. the lab's GPU recipe: a membership audit of LoRA on timm's ViT-B/16 (random weights, digits
#      upscaled into an image folder: it checks the code path, not the accuracy of a real ViT).
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

VIT="$OUT/vit_inputs"
step vit_inputs 120 "$PYTHON" - "$VIT" <<'PY'
import pathlib
import sys

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

out = pathlib.Path(sys.argv[1])
digits = load_digits()
for i, (image, label) in enumerate(zip(digits.images[:400], digits.target[:400])):
    folder = out / "images" / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((224, 224)).convert("RGB").save(folder / f"{i}.png")
torch.manual_seed(0)
state = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
save_file({k: v.contiguous() for k, v in state.items()}, str(out / "vit_b16_random.safetensors"))
PY
step audit_vit 240 "$PYTHON" audit.py +experiment=mia_rank_tiny task=image_folder "task.path=$VIT/images" \
  "task.backbone.weights=$VIT/vit_b16_random.safetensors" task.private_limit=64 task.pretrain.steps=20 \
  finetune.steps=20 "finetune.target_modules=[qkv]" "mia.configurations=[{method: lora, rank: 4}]" \
  mia.ensemble_size=10 lab.accelerator=gpu logger=csv "hydra.run.dir=$OUT/audit_vit" "paths.cache_dir=$OUT/cache"

{
  echo
  for section in featurise_gpu index_gpu; do
    sed -n "/<!-- $section:begin -->/,/<!-- $section:end -->/p" benchmarks/README.md | sed '1d;$d'
    echo
  done
  metrics=$(find "$OUT/train_gpu" -name metrics.json 2>/dev/null | head -n 1)
  [ -n "$metrics" ] && echo "train.py trainer=gpu on the bundled zoo, summary: \`$("$PYTHON" -c \
    'import json, sys; print(json.load(open(sys.argv[1]))["summary"])' "$metrics")\`"
  [ -f "$OUT/audit_vit/mia.json" ] && echo "audit.py on ViT-B/16 (random weights): \`$(tr -d '\n ' <"$OUT/audit_vit/mia.json")\`"
} >>"$REPORT"
cat "$REPORT"
