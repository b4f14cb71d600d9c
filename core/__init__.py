"""What every prefloop process shares: config models, error types, data formats, workspace paths.

Nothing here opens the database or loads a model; job subprocesses import ``core`` and never ``storage``.
"""
