#!/usr/bin/env bash
# One call on a lent GPU machine (one H100/H200, no network): install the missing packages from
# carried wheels, run the GPU-marked tests, measure training throughput, write everything to $OUT.
#
# Here, once:   bash benchmarks/gpu_wheels.sh                 (fills .whl/, ~7 MB, gitignored)
# Device tool:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# On CPU:       DRY_RUN=1 OUT=/tmp/gpu-dry bash benchmarks/gpu.sh  (tests/test_gpu_script.py: the
#               scaled-down throughput run and the test selection, so the script cannot rot)
#
# Written to $OUT (at most 8 files come back): run.log (everything), results.jsonl (one JSON line per
# figure), summary.md (paste into benchmarks/RESULTS.md), pytest.log, junit.xml, env.txt.
# Every part has its own timeout inside an overall budget (BUDGET_S, default 470 s), so one hang
# cannot eat the call: throughput first (~1 min), then the tests get what is left. Exit status: non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/runs/gpu-bench}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-470}
export PY=${PYTHON:-python3}  # the GPU image's python3 holds torch; the suite passes its own interpreter
mkdir -p "$OUT"
START=$(date +%s)
FAILED=()
exec > >(tee -a "$OUT/run.log") 2>&1

# Seconds a part may take: what it asks for, capped by what is left of the budget (10 s kept for the summary).
budget() {
  local left=$((BUDGET_S - ($(date +%s) - START) - 10))
  ((left < 5)) && left=5
  echo $(($1 < left ? $1 : left))
}

part() {  # part NAME SECONDS COMMAND...: run one part under its own timeout, record a failure
  local name=$1 limit
  limit=$(budget "$2")
  shift 2
  echo "=== $name (timeout ${limit}s, $(($(date +%s) - START))s so far)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "=== $name: TIMED OUT after ${limit}s"
  ((rc != 0)) && FAILED+=("$name (exit $rc)")
  return 0
}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ $DRY_RUN == 1 ]]; then
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export DS_ACCELERATOR=cuda  # tests/conftest.py defaults it to cpu for the CPU suite
  if ls .whl/*.whl >/dev/null 2>&1; then
    part install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/ carried: using what the machine has (run benchmarks/gpu_wheels.sh here and carry .whl)"
  fi
  export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'PY'
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for p in ("transformers", "peft", "accelerate", "deepspeed", "datasets", "trl", "omegaconf", "pyarrow", "pydantic", "typing-extensions", "flash-attn", "flash-attn-3", "kernels"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "-")
import launcher
print("launcher from", launcher.__file__)
PY
}
export -f env_report
export OUT
part env 30 bash -c 'set -o pipefail; env_report 2>&1 | tee "$OUT/env.txt"'

{
  echo "| config | device | attention | parameters | seq x micro batch | tokens/s | MFU | peak GiB | loss |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$OUT/summary.md"
if [[ $DRY_RUN == 1 ]]; then
  part "throughput (dry run)" 60 "$PY" benchmarks/gpu_throughput.py --dry-run --config full lora \
    --out "$OUT/results.jsonl" --summary "$OUT/summary.md"
else
  for config in full lora; do  # one process each (first: the figures are the point): peak memory of one configuration alone
    part "throughput $config" 100 "$PY" benchmarks/gpu_throughput.py --config "$config" --seq-len 2048 --micro-batch 8 --steps 20 \
      --out "$OUT/results.jsonl" --summary "$OUT/summary.md"
  done
fi

# GPU-marked tests anywhere under tests/ (others add theirs); without CUDA they skip. The dry run
# collects only this script's own test file, to stay cheap.
TESTS=(tests)
[[ $DRY_RUN == 1 ]] && TESTS=(tests/test_gpu.py)
# pytest-timeout (on the GPU image): a hung test fails alone instead of taking the rest with it.
"$PY" -c "import pytest_timeout" 2>/dev/null && TESTS+=(--timeout=200)
part "pytest -m gpu" 400 bash -c 'set -o pipefail; "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log"' pytest "${TESTS[@]}"

{
  echo
  echo "Qwen2.5-0.5B shape, random weights, bf16 (ddp: fp32 master weights + autocast, fused AdamW), one GPU;"
  echo "MFU by launcher/flops.py (6N + attention; LoRA's frozen weights need no weight-gradient matmuls, so"
  echo "its MFU by this count overstates). Command: \`bash benchmarks/gpu.sh\` (device tool, carry [\".whl\"])."
  echo "Tests: $(grep -E '^[0-9]+ (passed|failed|skipped)|passed|failed' "$OUT/pytest.log" | tail -1)"
  echo "Failed parts: ${FAILED[*]:-none}. Took $(($(date +%s) - START)) s."
} >> "$OUT/summary.md"
cat "$OUT/summary.md"
((${#FAILED[@]} == 0))
