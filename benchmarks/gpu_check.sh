#!/usr/bin/env bash
# The one prepared run for a lent single-GPU machine (no network, PyTorch preinstalled, no NeMo/Megatron/TE):
#   1. install the carried wheels (.whl/, see docs/perf.md for how they are fetched) into /tmp/site;
#   2. benchmarks/bench_gpu.py at the ~1B size (local spec, BF16, megatron-core unpatched, NCCL 1-rank group);
#   3. the single-process model tests on CUDA (megatron-core unpatched; the CPU shim is inactive).
# Multi-rank tests (TP/PP/DP/CP = 2) need one GPU per rank under NCCL, so they are deselected on one GPU.
# Writes gpu.txt, bench*.json/log and pytest.log under OUT_DIR.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [all|bench|tests]
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [all|bench|tests]}
WHAT=${2:-all}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# espeak-ng (the test corpus' speech): carried libraries that the image lacks, and the voice data.
if [ -d .gpu/lib ]; then
  for f in .gpu/lib/*; do ldconfig -p | grep -q "$(basename "$f") " && rm -f "$f"; done
  export LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  [ -d /usr/lib/x86_64-linux-gnu/espeak-ng-data ] || cp -r .gpu/espeak-ng-data /usr/lib/x86_64-linux-gnu/
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; date -u; nproc
  python3 -c "import torch, megatron.core, nemo, lhotse, lightning; print('torch', torch.__version__, 'mcore',
  megatron.core.__version__, 'nemo', nemo.__version__, 'lhotse', lhotse.__version__, 'lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

if [ "$WHAT" != tests ]; then
B="python3 benchmarks/bench_gpu.py --steps 20 --warmup 5"
timeout 150 $B --configs local-bf16-autocast,local-bf16-params --torch-profile 2 --out "$OUT/bench_b2.json" 2>&1 \
  | tee "$OUT/bench.log"
timeout 90 $B --configs local-bf16-params --batch 8 --torch-profile 2 --out "$OUT/bench_b8.json" 2>&1 | tee -a "$OUT/bench.log"
timeout 90 $B --configs local-bf16-params --batch 4 --microbatches 4 --out "$OUT/bench_b4x4.json" 2>&1 | tee -a "$OUT/bench.log"
fi

[ "$WHAT" = bench ] && exit 0
# (test_generate's decoding tests share one TP=2 fixture; test_overfit still decodes greedily on the GPU.)
MULTI="tp2 or data_parallel or context_parallel or model_parallel_matches or kv_cache or rows_do_not or eos_stops"
# SIGINT at the limit: pytest then still prints its failures and summary.
timeout -s INT 240 python3 -m pytest -q -rfE -p no:cacheprovider --timeout 150 tests/modules tests/models \
  -k "not ($MULTI)" --deselect "tests/modules/test_hf_import.py::test_logit_parity_with_hf[2]" 2>&1 | tee "$OUT/pytest.log" | tail -40
