#!/bin/bash
# join the three per-seed task runs into one root/out (symlinked model dirs, report paths rewritten)
set -e
R=/work/runs/m11d
mkdir -p $R/task-6ep/models
: > $R/task-6ep/records.jsonl
for K in 0 1 2; do
  for d in $R/task-6ep-s$K/models/*; do ln -sfn $d $R/task-6ep/models/$(basename $d); done
  sed "s#$R/task-6ep-s$K/models#$R/task-6ep/models#g" $R/task-6ep-s$K/records.jsonl >> $R/task-6ep/records.jsonl
done
cd /work/main
OMP_NUM_THREADS=1 PYTHONPATH=src:experiments .venv/bin/python experiments/learned_equivariance.py task \
  --data fashion-mnist --epochs 6 --test-images 5000 --images 2000 --threads 1 --seeds 3 \
  --root $R/task-6ep/models --out $R/task-6ep
