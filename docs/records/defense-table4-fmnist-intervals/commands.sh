# session 2026-12-02, 18:08-18:45 UTC, commit 73aa01e (table4 with per-image scores), one core;
# the model: the seed-0 cnn7 retrained for images 64-127 (docs/records/defense-table1-fmnist-64-127)
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
python experiments/defense.py table4 --data fashion-mnist --tasks cls --n 64 --threads 1 \
    --runs /work/runs/d14
