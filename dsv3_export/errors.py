"""Exit codes of the CLI and the error type that carries one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_ACCURACY = 3  # `diff` found the engine over tolerance


class CliError(Exception):
    """An error the CLI reports in one line (no traceback) with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code
