#!/bin/bash
# after seed K's width,arch pool process ends, train the augmentation groups of seed K (same root)
K=$1
while pgrep -f "pool --studies width,arch .*--first-seed $K " > /dev/null; do sleep 20; done
cd /work/main
OMP_NUM_THREADS=1 PYTHONPATH=src:experiments /usr/bin/time -v -o /work/runs/m11d/logs/pool48-aug-s$K.time .venv/bin/python experiments/learned_equivariance.py pool --studies augment --data fashion-mnist --images 1000 --threads 1 --train-images 48000 --seeds 1 --first-seed $K --root /work/runs/m11d/pool48k/models --out /work/runs/m11d/pool48k-aug-s$K > /work/runs/m11d/logs/pool48-aug-s$K.log 2>&1
