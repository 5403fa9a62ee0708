#!/usr/bin/env bash
# cotune's GPU check: on a machine with CUDA, run the GPU test subset and the GPU benchmarks and
# print their figures (about 5-7 minutes on an H100/H200). Usage, from the repository root:
#
#   bash scripts/gpu_check.sh            # uses .venv if it exists, else python3
#   PY=/path/to/python bash scripts/gpu_check.sh
#
# What it needs: a Python with a CUDA build of torch 2.13, and cotune's dependencies. If the
# interpreter has no CUDA torch, the script makes .venv-gpu and installs them (needs the
# package index; an offline GPU box needs its wheels carried in, e.g. a pip --find-links dir
# named in PIP_FIND_LINKS). Results go to stdout and to gpu_check/ (a log per part).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! has_cuda "$PY"; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): nothing to check" >&2
    exit 2
  fi
  echo "gpu_check: $PY has no CUDA torch; installing one into .venv-gpu" >&2
  python3 -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
    || "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[dev]"
  has_cuda "$PY" || { echo "gpu_check: torch still sees no GPU" >&2; exit 2; }
fi
# Packages that a bare GPU box may lack (pip is quiet when they are there).
"$PY" -c "import bitsandbytes, peft, pytest" 2>/dev/null || "$PY" -m pip install -q -e ".[dev]"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import torch
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
PYEOF
status=0
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; status=1; }
}
run gpu-tests 240 "$PY" -m pytest -q tests/gpu tests/accel -p no:cacheprovider
run lora-step 120 "$PY" benchmarks/gpu_lora_step.py --batch 8 --seq 512 --blocks 5 --steps 5
run split-mfu 60 "$PY" benchmarks/gpu_split_mfu.py --cut 4 --batch 16 --seq 512
run fedavg-cohort 180 "$PY" benchmarks/fedavg_cohort.py --device cuda --qwen05b --devices 8 \
  --local-steps 2 --rounds 2 --batch 4 --seq 256 --repeats 1
echo "== summary"
grep -h -E "passed|failed|cotune / PEFT|MFU|cohort / one by one" "$OUT"/*.log
exit $status
