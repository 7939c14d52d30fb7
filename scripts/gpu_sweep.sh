#!/usr/bin/env bash
# One GPU session's sweep (run through the device tool from the repo root; writes under $OUT):
# the GPU test-suite for the kernels, the prefill benchmark (tuning + full sweep), the decode benchmark.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_api.py tests/test_patterns.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout ${PREFILL_TIMEOUT:-330} python3 -m sparsattn.bench.prefill --out "$OUT" 2>&1 | grep -v -i warn | tail -30
if [ "${DECODE:-1}" = 1 ]; then
  timeout ${DECODE_TIMEOUT:-150} python3 -m sparsattn.bench.decode --out "$OUT/decode_bench.csv" ${DECODE_ARGS:-} 2>&1 | grep -v -i warn | tail -30
fi
if [ "${METHODS:-1}" = 1 ]; then
  timeout ${METHODS_TIMEOUT:-200} python3 -m sparsattn.bench.methods --out "$OUT" 2>&1 | grep "^\[methods\]"
fi
