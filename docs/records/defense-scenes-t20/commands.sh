# session 2026-12-02 17:23-19:45 UTC, commits df2a1cc..4bc5fe0 (same cascade code); one process per core
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
/usr/bin/time -v -o $L/seg-models.time .venv/bin/python experiments/defense.py models \
  --tasks seg --seeds 0 --no-heads --threads 1 --runs $R > $L/seg-models.log 2>&1
/usr/bin/time -v -o $L/wc-seg-Vanilla.time .venv/bin/python experiments/defense.py worstcase \
  --tasks seg --seeds 0 --columns Vanilla --undefended-n 128 --attack-size full \
  --threads 1 --runs $R > $L/wc-seg-Vanilla.log 2>&1
/usr/bin/time -v -o $L/wc-seg-Eq-0.time .venv/bin/python experiments/defense.py worstcase \
  --tasks seg --seeds 0 --columns Equivariance --n 1 --offset 0 --clean-n 16 --attack-size full \
  --defense-steps 20 --threads 1 --runs $R > $L/wc-seg-Eq-0.log 2>&1
echo all-done > $L/coreF.done
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
for spec in 1:3 4:4 8:4 12:4 16:4 20:4; do off=${spec%:*}; n=${spec#*:}
  /usr/bin/time -v -o $L/wc-seg-Eq-$off.time .venv/bin/python experiments/defense.py worstcase \
    --tasks seg --seeds 0 --columns Equivariance --n $n --offset $off --clean-n 16 \
    --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-seg-Eq-$off.log 2>&1
done
echo all-done > $L/coreG.done
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
while [ ! -f $L/coreE.done ]; do sleep 20; done
for off in 0 4; do
  /usr/bin/time -v -o $L/wc-seg-Inv-$off.time .venv/bin/python experiments/defense.py worstcase \
    --tasks seg --seeds 0 --columns Invariance --n 4 --offset $off --clean-n 16 \
    --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-seg-Inv-$off.log 2>&1
done
echo all-done > $L/coreH.done
cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
R=/work/runs/d14; L=$R/logs
while [ ! -f $L/coreH.done ]; do sleep 10; done
/usr/bin/time -v -o $L/wc-seg-Inv-8.time .venv/bin/python experiments/defense.py worstcase \
  --tasks seg --seeds 0 --columns Invariance --n 4 --offset 8 --clean-n 16 \
  --attack-size full --defense-steps 20 --threads 1 --runs $R > $L/wc-seg-Inv-8.log 2>&1
echo all-done > $L/coreI.done
python experiments/defense.py worstcase --tasks seg --seeds 0 --report-only --columns Vanilla,Invariance,Equivariance --runs /work/runs/d14
