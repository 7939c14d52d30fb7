#!/usr/bin/env bash
# One GPU session's sweep, run through the device tool from the repo root (10-minute call limit).
#   phase 1 (side by side, light GPU use): the GPU test-suite, the prefill and decode quality sweeps
#           on the bundled model (each time-limited);
#   phase 2 (alone on the GPU, timings): the methods benchmark and the decode benchmark.
# Everything lands in $OUT/results.tgz (the device returns at most 8 files) plus the logs.
# Knobs: TESTS=0 / QUALITY=0 / METHODS=0 / DECODE=0 skip a part; PREFILL=1 adds the prefill kernel
# benchmark (long: give it its own call); *_TIMEOUT override the time limits.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}
R=$OUT/results
mkdir -p "$R"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"
  date -u
} | tee "$OUT/gpu.txt"
pids=()
if [ "${TESTS:-1}" = 1 ]; then
  (timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -n 8 -q -p no:cacheprovider tests/kernels tests/test_api.py \
     tests/test_patterns.py tests/integrations > "$OUT/gpu_tests.log" 2>&1; echo "exit $?" >> "$OUT/gpu_tests.log") &
  pids+=($!)
fi
if [ "${QUALITY:-1}" = 1 ]; then
  (timeout "${QUALITY_TIMEOUT:-300}" python3 -m sparsattn.eval.prefill_quality --out "$R/prefill_quality" --device cuda \
     ${PREFILL_QUALITY_ARGS:-} > "$R/prefill_quality.log" 2>&1; echo "exit $?" >> "$R/prefill_quality.log") &
  pids+=($!)
  (timeout "${QUALITY_TIMEOUT:-300}" python3 -m sparsattn.eval.decode_quality --out "$R/decode_quality" --device cuda \
     ${DECODE_QUALITY_ARGS:-} > "$R/decode_quality.log" 2>&1; echo "exit $?" >> "$R/decode_quality.log") &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
tail -3 "$OUT/gpu_tests.log" 2>/dev/null
tail -2 "$R/prefill_quality.log" "$R/decode_quality.log" 2>/dev/null
if [ "${METHODS:-1}" = 1 ]; then
  timeout "${METHODS_TIMEOUT:-130}" python3 -m sparsattn.bench.methods --out "$R" 2>&1 | grep "^\[methods\]"
fi
if [ "${DECODE:-1}" = 1 ]; then
  timeout "${DECODE_TIMEOUT:-110}" python3 -m sparsattn.bench.decode --no-tune --page-sizes 1 16 32 64 \
    --out "$R/decode_bench.csv" 2>&1 | grep -v -i warn > "$R/decode_bench.log"  # rows print as they come
  tail -40 "$R/decode_bench.log"
fi
if [ "${PREFILL:-0}" = 1 ]; then
  timeout "${PREFILL_TIMEOUT:-330}" python3 -m sparsattn.bench.prefill --out "$R" 2>&1 | grep -v -i warn | tail -30
fi
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$R"
ls -la "$OUT"
