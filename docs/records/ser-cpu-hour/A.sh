cd /work/main
export OMP_NUM_THREADS=1 PYTHONPATH=src:experiments
/usr/bin/time -v .venv/bin/python experiments/ser.py arms --preset cpu-hour --device cpu --seeds 0 --out /work/runs/s15c/seeds-A --quiet >> /work/runs/s15c/A.log 2>&1
echo done > /work/runs/s15c/A.done
