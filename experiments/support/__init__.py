"""Support code of the experiment scripts in ``experiments/`` (not part of the
``equivision`` library): training-and-measuring runs and their summaries
(:mod:`.studies`), rank correlations (:mod:`.stats`), rotation-robustness training and
plots (:mod:`.rotations`).

The scripts run as ``python experiments/NAME.py``, which puts ``experiments/`` on
``sys.path``, and import ``support.studies`` etc.; pytest puts the folder on its path too
(``pythonpath`` in ``pyproject.toml``).
"""
