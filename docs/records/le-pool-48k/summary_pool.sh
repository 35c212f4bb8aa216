#!/bin/bash
# join the per-seed pool processes' records (augment runs first, so the width/arch runs'
# records, with their real training times, are the ones kept) and write the summaries
set -e
R=/work/runs/m11d
STUDIES=${1:-augment,width,arch}
mkdir -p $R/pool48k
cat $(ls $R/pool48k-aug-s*/records.jsonl $R/pool48k-s*/records.jsonl 2>/dev/null) > $R/pool48k/records.jsonl
cd /work/main
OMP_NUM_THREADS=1 PYTHONPATH=src:experiments .venv/bin/python experiments/learned_equivariance.py \
  pool-summary --studies $STUDIES --data fashion-mnist --images 1000 --threads 1 --train-images 48000 \
  --seeds 3 --root $R/pool48k/models --out $R/pool48k
