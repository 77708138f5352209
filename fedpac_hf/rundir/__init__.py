"""What a run leaves on disk: its directory, checkpoints, metrics files and report.

- ``output_dir.py``: one owner per run directory (a lock; no silent start over
  another run's files);
- ``checkpoint.py``: round checkpoints (safetensors + JSON, written atomically);
- ``resume.py``: the run identity a resume checks and the one resume path;
- ``metrics_file.py``: ``metrics.jsonl`` / ``metrics.csv`` / ``config.yaml``;
- ``reporting.py``, ``plots.py``: ``summary.md`` and the figures.
"""
