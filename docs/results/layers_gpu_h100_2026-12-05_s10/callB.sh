# Call B (session 10), right after A on the same machine: MQAR T = 512 width 128 resumed (issue 12),
# LRA Pathfinder-32 for dense and the 2-D layers (issue 12), BaseConv's [3, -1] preset at T = 256 (issue 13).
set -u; CALL=callB
. docs/results/layers_gpu_h100_2026-12-05_s10/common.sh
ls -la .ckpt/* > $R/ckpt_at_start.txt 2>&1
python scripts/gpu_mqar_sweep.py --out $R/b512_w128 $W128 --layers routing biformer --workers 2 > $R/b512_w128.log 2>&1 &
python scripts/gpu_mqar_sweep.py --out $R/b512_sel0 $W128 --layers selective --seeds 0 --workers 1 > $R/b512_sel0.log 2>&1 &
# Pathfinder-32: the full grid's model (4 layers, width 128, 8 heads, batch 64, 160 000 images), one call
python scripts/gpu_mqar_sweep.py --out $R/pf32 --task pathfinder --seq-len 1024 --widths 128 --hybrids \
  --layers dense biformer neighborhood halo sparsifiner --steps 20000 $LIM --n-layers 4 --heads 8 \
  --batch-size 64 --n-train 160000 --eval-every 500 --workers 5 > $R/pf32.log 2>&1 &
# BaseConv with Zoology's short-then-long kernels ([3, -1], the new mqar preset), T = 256
python scripts/gpu_mqar_sweep.py --out $R/bc256_w512 --seq-len 256 --hybrids --steps 8000 $LIM --widths 512 \
  --layers baseconv --lrs 0.001 0.0022 --workers 2 > $R/bc256_w512.log 2>&1 &
python scripts/gpu_mqar_sweep.py --out $R/bc256_w256 --seq-len 256 --hybrids --steps 8000 $LIM --widths 256 \
  --layers baseconv --lrs 0.001 --workers 1 > $R/bc256_w256.log 2>&1 &
wait
pack
