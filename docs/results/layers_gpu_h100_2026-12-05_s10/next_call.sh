# Prepared for the next session's device calls (not run). Run it twice back to back on one warm
# machine: routing at T = 512 (issue 12) goes on from /tmp/ckpt in the second call; Pathfinder-32
# (dense and the 2-D layers) runs in each call (the second call's runs resume the first's);
# the kernel tests name their failures (-rfE, line tracebacks) in a log under $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=/tmp/r_next; mkdir -p $R
bash scripts/device_pack.sh $R next 60 &
PACKER=$!
{ nvidia-smi --query-gpu=name,driver_version --format=csv; date -u
  python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >> $R/gpu.txt 2>&1
LIM="--time-limit 470 --deadline 540 --checkpoint-dir /tmp/ckpt"
timeout 300 python -m pytest -n 3 -rfE --tb=line -q tests/kernels > $R/kernel_tests.log 2>&1 &
python scripts/gpu_mqar_sweep.py --out $R/routing512_$(date +%H%M) --seq-len 512 --hybrids --steps 16000 $LIM \
  --schedule-time 940 --widths 128 --layers routing --lrs 0.002 --workers 1 > $R/routing512_$(date +%H%M).log 2>&1 &
python scripts/gpu_mqar_sweep.py --out $R/pf32_$(date +%H%M) --task pathfinder --seq-len 1024 --widths 128 --hybrids \
  --layers dense biformer neighborhood halo sparsifiner --steps 20000 $LIM --schedule-time 940 --n-layers 4 \
  --heads 8 --batch-size 64 --n-train 64000 --eval-every 500 --workers 5 > $R/pf32_$(date +%H%M).log 2>&1 &
wait $(jobs -p | grep -v "^$PACKER$")
kill $PACKER; bash scripts/device_pack.sh $R next 0
