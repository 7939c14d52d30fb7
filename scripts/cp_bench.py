"""cp_bench: sparse context-parallel attention benchmark (logic in sparsattn/distributed/bench.py).

CPU smoke (gloo, spawned processes):
    OMP_NUM_THREADS=1 python scripts/cp_bench.py --spawn 2 --seq-lens 2048 --q-heads 4 --kv-heads 2 \
        --head-dim 32 --block 64 --dtype fp32 --kernel-backend reference --out cp_smoke.csv
GPUs (NCCL, issue 19), one process per GPU:
    torchrun --nproc-per-node 4 scripts/cp_bench.py --seq-lens 262144,524288,1048576 \
        --densities 0.05,0.1,1.0 --torch-cp --check --out cp_h200_x4.csv
"""
from sparsattn.distributed.bench import main

if __name__ == "__main__":
    main()
