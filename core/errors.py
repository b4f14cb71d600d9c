"""prefloop's own error types.

Library errors are wrapped at the boundary into one of these, with a message a person can act on.
The CLI prints ``str(err)`` as one red line and exits with ``err.exit_code``; the app shows it as
``gr.Error``.
"""

from __future__ import annotations


class PrefloopError(Exception):
    """Base class: an error whose message is meant for the person running prefloop."""

    exit_code = 1


class UsageError(PrefloopError):
    """Wrong arguments or a folder that is not what the command needs."""

    exit_code = 2


class NotAWorkspace(UsageError):
    """The folder has no prefloop.toml / prefloop.duckdb."""


class ConfigError(UsageError):
    """prefloop.toml (or a round config) failed validation."""


class WorkspaceInUse(PrefloopError):
    """Another process owns the workspace database."""

    exit_code = 3


class ImportRejected(PrefloopError):
    """An import had bad rows; nothing was imported (unless --skip-bad)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class UnsafeQuery(PrefloopError):
    """The export guard refused a SQL statement."""

    exit_code = 2


class QueryTimeout(PrefloopError):
    """A read-only query ran past its time limit and was interrupted."""


class ModelNotAvailable(PrefloopError):
    """A model name that cannot be loaded here (offline, missing files, missing extra)."""


class JobFailed(PrefloopError):
    """A job subprocess exited with an error; the step is marked failed and can be retried."""


class Waiting(PrefloopError):
    """Not a failure: a step waits for something outside prefloop (a Gemini batch job). The round stops
    there with status ``waiting``, nothing is lost, and `prefloop round resume` continues."""

    exit_code = 0
    round_status = "waiting"

    def __init__(self, what: str):
        """``what`` completes "round 3 waits for ...": "Gemini batch batches/abc (state RUNNING, ...)"."""
        super().__init__(f"waiting for {what}")
        self.what = what


class AuthError(PrefloopError):
    """Not logged in, wrong password, or a role that may not do this."""

    exit_code = 4
