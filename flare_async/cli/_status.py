"""The exit statuses of every ``flare-async`` command (docs/deployment.md, "Exit codes and
errors"): one place, for the central handler and the commands that exit on their own."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]
