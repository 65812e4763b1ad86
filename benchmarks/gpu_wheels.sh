#!/usr/bin/env bash
# The Python packages that the GPU machine's image lacks, as wheels for its Python (3.12, x86_64),
# at the versions of this checkout's .venv, downloaded here into .gpu_wheels (ignored by git) for
# the device tool to carry; the image's own torch, lightning, peft and transformers are used as
# they are. See benchmarks/gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
PIP=${PIP:-.venv/bin/pip}
PACKAGES="hydra-core omegaconf diffusers opacus faiss-cpu datasets kronfluence einconv"
pins=$("$PIP" freeze 2>/dev/null | grep -i -E "^($(echo "$PACKAGES" | tr ' ' '|'))==" | grep -v -i antlr4)
rm -rf .gpu_wheels
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --dest .gpu_wheels \
  $pins
"$PIP" wheel --quiet --no-deps --wheel-dir .gpu_wheels "antlr4-python3-runtime==4.9.3"  # omegaconf's pin; sdist only
# the ViT-B/16 recipe's timm (pure Python; the .venv has none to pin from); its torchvision is the image's
"$PIP" download --quiet --no-deps --only-binary=:all: --dest .gpu_wheels "timm==${TIMM_VERSION:-1.0.31}"
du -sh .gpu_wheels
