"""The project's one exception tree.

    TestbedError                 anything the testbed reports to a person
     +-- InputError              bad input: topology, names, sizes, workload specs
     |    +-- PrecheckFailed     a relocate's prechecks found errors (carries the failed checks)
     +-- NotFound                a lab, host, VM, datastore or disk that does not exist
     +-- Conflict                a name already taken, a lab already up
     +-- LabError                building or tearing down the lab failed
     +-- HostError               a host could not do what was asked
     |    +-- HostUnreachable    SSH to the host failed (refused key, no route, ...)
     |    +-- AgentError         the host agent answered with an error
     +-- QemuError               QEMU failed to launch or a QMP command failed
     +-- CommandError            a local command exited non-zero
     +-- MigrationError          a move failed in a phase (the engine)
     +-- ApiError                a vCenter answered an API call with an error (its HTTP status)
     |    +-- ApiForbidden       ... with a 403 (also a Forbidden)
     +-- ThumbprintMismatch      a server's certificate is not the pinned one: nothing was sent
     +-- Unauthorized            401: no token, a bad, expired or another domain's one
     |    +-- TokenError         why a session token was refused
     +-- Forbidden               403: authenticated, but not allowed
     |    +-- TicketRefused      a host agent refused a request outside its connection's ticket
     +-- PhaseError              an illegal phase transition: a bug in the engine, never a user error

Every message says what was tried, on which host or VM, and what to do.
Wrapping keeps the cause (``raise X(...) from err``).
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base of every error the testbed reports to a person."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  what to do: {self.hint}"
        return self.message


class InputError(TestbedError):
    """The user gave something malformed."""


class PrecheckFailed(InputError):
    """A relocate's named prechecks found errors; ``checks`` are the failed ones (name, status, message, hint)."""

    def __init__(self, message: str, *, checks: list[dict[str, object]], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.checks = checks


class NotFound(TestbedError):
    """The named thing does not exist."""


class Conflict(TestbedError):
    """The name is taken or the thing is already in that state."""


class LabError(TestbedError):
    """Building or tearing down the lab failed."""


class HostError(TestbedError):
    """A host could not do what was asked."""


class HostUnreachable(HostError):
    """The host could not be reached over SSH."""


class AgentError(HostError):
    """The host agent answered with an error.

    ``kind`` is the remote error's class name, so callers can tell a
    NotFound on the host from a QEMU failure.
    """

    def __init__(self, message: str, *, kind: str = "AgentError", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class QemuError(TestbedError):
    """QEMU failed to launch, or a QMP command failed."""


class CommandError(TestbedError):
    """A local command failed; carries the command, exit status and output."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        msg = f"command failed (exit {returncode}): {' '.join(argv)}"
        if tail:
            msg += "\n    " + "\n    ".join(tail)
        super().__init__(msg)
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class MigrationError(TestbedError):
    """The migration failed in a phase; the message says where and why."""


class ApiError(TestbedError):
    """A vCenter's answer to an API call was an error: its HTTP status and vSphere-style error type."""

    def __init__(self, status: int, message: str, *, error_type: str = "ERROR", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.error_type = error_type


class ThumbprintMismatch(TestbedError):
    """The server's certificate is not the one pinned: nothing was sent to it."""


class Unauthorized(TestbedError):
    """401: no token, a bad one, an expired one, or another domain's."""


class TokenError(Unauthorized):
    """Why a session token was refused (the 401's message)."""


class Forbidden(TestbedError):
    """403: authenticated, but not allowed (e.g. a peer vCenter that is not trusted)."""


class TicketRefused(Forbidden):
    """A host agent refused a request outside the scope of the ticket its connection is bound to (another VM,
    a method the ticket does not allow, an expired or revoked ticket)."""


class ApiForbidden(ApiError, Forbidden):
    """A vCenter's 403 to an API call: caught as ``Forbidden`` for what it means, or as an ``ApiError`` with its
    status (``testbed.vcenter.client``)."""


class PhaseError(TestbedError):
    """An illegal phase transition: a bug in the engine, never a user error."""

    def __init__(self, current: object, wanted: object) -> None:
        c, w = (getattr(x, "value", x) for x in (current, wanted))
        super().__init__(f"illegal phase transition {c} -> {w}")
        self.current, self.wanted = current, wanted
