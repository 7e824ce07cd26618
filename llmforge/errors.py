"""The error hierarchy: every user-facing failure is a ForgeError with a message, a hint and an exit code.

The CLI turns a ForgeError into one line on stderr and its exit code; a traceback is shown only with --debug.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed: a stage raised
EXIT_BAD_INPUT = 2  # config, data or arguments are wrong
EXIT_INTERRUPTED = 130  # stopped on request, after saving


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located by a key path (`stages[2].lora.r`) or `file:line`."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ForgeError(Exception):
    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = self.message
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class UsageError(ForgeError):
    """Bad arguments or a request that cannot be honoured as asked."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(ForgeError):
    """forge.toml (or --set overrides) is invalid; carries every problem found, not just the first."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[Problem], source: str | None = None, hint: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        n = len(self.problems)
        lines = [f"{head}{n} problem{'s' if n != 1 else ''} found:"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines), hint)


class DataError(ForgeError):
    """Bad training data; the message names file, line and field."""

    exit_code = EXIT_BAD_INPUT


class LockedError(ForgeError):
    """Another live process writes this run."""

    exit_code = EXIT_BAD_INPUT


class StageFailed(ForgeError):
    exit_code = EXIT_FAILED
