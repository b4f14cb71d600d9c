"""Job entry points: one readable script per job, run as ``python -m backend.jobs.NAME RUN_DIR``.

A job reads ``RUN_DIR/config.json`` (its model in ``backend.jobs.configs``, which embeds the workspace
config sections it runs on) and its input Parquet, speaks JSON lines on stdout, writes its
outputs atomically, and never opens the database (tests/test_layers.py checks the imports).
"""
