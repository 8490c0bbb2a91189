"""The few errors gcd raises; cli.py maps each family to an exit code."""

from __future__ import annotations


class GcdError(Exception):
    """Base of every error gcd reports to the user without a traceback."""

    exit_code = 1


class UsageError(GcdError):
    """Bad command-line usage or an argument that names nothing (exit 2)."""

    exit_code = 2


class ConfigError(GcdError):
    """One or more configuration problems, each already formatted as file:line: key: message."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class StateError(GcdError):
    """gcd's own state store cannot be used (e.g. state_dir not writable); exit 2."""

    exit_code = 2


class EngineError(GcdError):
    """The engine answered a request with an error that is not a conflict or a 404."""

    exit_code = 1


class EngineUnavailable(EngineError):
    """The engine cannot be reached or did not answer in time (exit 3). `sent`: the request
    reached the engine before its answer failed, so the engine may still carry it out."""

    exit_code = 3

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class ConflictError(EngineError):
    """HTTP 409: the engine refused (image in use, has children, ...). A skip, not a failure."""


class NotFoundError(EngineError):
    """HTTP 404: the image or reference is already gone. A skip, not a failure."""


class LockBusy(GcdError):
    """Another gcd cycle held the state lock for longer than we wait (exit 1)."""

    exit_code = 1


class Stopped(GcdError):
    """The cycle was asked to stop (SIGTERM) before it had planned anything."""

    exit_code = 0
