# Sourced by callA.sh / callB.sh with CALL set: environment, versions, the sweeps' shared flags.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=/tmp/r_$CALL; rm -rf $R; mkdir -p $R
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } > $R/gpu.txt 2>&1
# Every training run stops after --time-limit seconds (then evaluates); the sweep ends by --deadline.
LIM="--time-limit 480 --deadline 520"
# MQAR at T = 512 (issue 12), width 128, over calls A and B: a run cut by its time limit saves its
# state under .ckpt (ignored by git, kept on the warm machine) and call B's identical command
# resumes it; the learning-rate schedule spans both calls (--schedule-time 960).
W128="--seq-len 512 --hybrids --steps 16000 $LIM --checkpoint-dir .ckpt --schedule-time 960 --widths 128 --lrs 0.002"
pack() { ls -la $R; tar czf $OUT/$CALL.tgz -C $R . ; }
