#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels a lent GPU machine lacks, into .whl/ (gitignored).
# The GPU machine has torch, transformers, peft and accelerate but no network, and not deepspeed,
# trl, datasets, omegaconf or their missing dependencies; benchmarks/gpu.sh installs these from .whl/.
#
#   bash benchmarks/gpu_wheels.sh          # ~10 MB; then call the device tool with
#   carry: [".whl"]   command: "bash benchmarks/gpu.sh"
#
# Versions are the ones this project is tested with on CPU. DeepSpeed publishes only an sdist: it is
# built here into a pure-Python wheel (DS_BUILD_OPS=0: no compiled ops; the launcher uses torch's
# AdamW, so none are needed, and DeepSpeed can JIT-build one on the GPU machine if ever asked).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PY=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")
WHEELS=(
  trl==1.16.0 datasets==5.2.0 omegaconf==2.4.0
  dill==0.4.1 multiprocess==0.70.19                                        # datasets
  hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2  # deepspeed
)
python3 -m pip download -q --no-deps "${PY[@]}" -d "$DEST" "${WHEELS[@]}"
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  # --no-build-isolation: DeepSpeed's setup.py imports torch; the installed one is enough for a no-ops build.
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi
ls "$DEST"/deepspeed-0.19.8-py3-none-any.whl >/dev/null  # pure Python, or it would not install on 3.12
du -ch "$DEST"/*.whl | tail -1
