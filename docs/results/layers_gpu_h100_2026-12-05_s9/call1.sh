#!/bin/bash
# issue 12 (MQAR T=512) + issue 13 (hyper smem repro, kernel smem probe); one device call
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
W=/tmp/r; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $W/gpu.txt
python -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $W/gpu.txt
git rev-parse HEAD >> $W/gpu.txt 2>/dev/null
S="python scripts/gpu_mqar_sweep.py --seq-len 512 --hybrids --steps 8000 --time-limit 500 --deadline 555"
$S --out $W/a --widths 128 --layers routing sparsifiner biformer --workers 3 > $W/a.log 2>&1 &
$S --out $W/b --widths 128 --layers selective --seeds 1 --lrs 0.001 0.002 --workers 2 > $W/b.log 2>&1 &
$S --out $W/c --widths 256 --layers landmark --lrs 0.001 --workers 1 > $W/c.log 2>&1 &
(timeout 150 python scripts/gpu_hyper_smem_repro.py --out $W/repro.jsonl > $W/repro.log 2>&1;
 timeout 240 python scripts/gpu_kernel_smem_probe.py --out $W/probe.json --dims 128 256 64 --lens 32 200 1000 > $W/probe.log 2>&1) &
sleep 60; nvidia-smi > $W/smi60.txt
wait
tar czf $OUT/r.tar.gz -C /tmp r
tail -5 $W/*.log
