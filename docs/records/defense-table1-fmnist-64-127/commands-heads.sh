# session 2026-12-02 17:17 UTC, commit df2a1cc (Rotation) / df2a1cc-0b33e28 (Contrastive: the same cascade code); two cores, one process each
#!/bin/bash
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
for off in 64 80 96 112; do
  /usr/bin/time -v -o $L/wc-Rotation-$off.time .venv/bin/python experiments/defense.py worstcase \
    --data fashion-mnist --tasks cls --seeds 0 --columns Rotation --n 16 --offset $off \
    --clean-n 64 --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-Rotation-$off.log 2>&1
done
echo all-done > $L/coreC.done
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
for off in 80 96 112; do
  /usr/bin/time -v -o $L/wc-Contrastive-$off.time .venv/bin/python experiments/defense.py worstcase \
    --data fashion-mnist --tasks cls --seeds 0 --columns Contrastive --n 16 --offset $off \
    --clean-n 64 --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-Contrastive-$off.log 2>&1
done
echo all-done > $L/coreD.done
# joined report (nothing run):
python experiments/defense.py worstcase --data fashion-mnist --tasks cls --seeds 0 --report-only --columns Vanilla,Random,Invariance,Equivariance,Rotation,Contrastive --runs /work/runs/d14
