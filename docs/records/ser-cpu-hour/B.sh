cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
/usr/bin/time -v .venv/bin/python experiments/ser.py arms --preset cpu-hour --device cpu --seeds 2 --out /work/runs/s15c/seeds-B --quiet >> /work/runs/s15c/B.log 2>&1
echo done > /work/runs/s15c/B.done
