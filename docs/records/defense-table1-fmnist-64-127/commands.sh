#!/bin/bash
cd /work/main
while [ ! -f .venv/.installed ]; do sleep 5; done
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
/usr/bin/time -v -o $L/models.time .venv/bin/python experiments/defense.py models --data fashion-mnist --tasks cls --seeds 0 --no-heads --threads 1 --runs $R > $L/models.log 2>&1
echo models-done > $L/models.done
for off in 64 80 96 112; do for col in Equivariance Invariance Random; do
  /usr/bin/time -v -o $L/wc-$col-$off.time .venv/bin/python experiments/defense.py worstcase \
    --data fashion-mnist --tasks cls --seeds 0 --columns $col --n 16 --offset $off \
    --clean-n 64 --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-$col-$off.log 2>&1
done; done
echo all-done > $L/coreA.done
