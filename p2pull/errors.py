"""The exception tree of p2pull.

Every error p2pull raises on purpose derives from one root, so callers and the CLI can tell
ours from bugs. Lower-level exceptions (httpx, OSError, tarfile) are mapped at the edge that
meets them to the most specific class here, with ``raise ... from exc``.

    P2pullError
    ├── UsageError             bad input from the user: config values, arguments
    │   └── RefError           a malformed reference; names the bad part
    ├── OriginError            talking to a registry failed
    │   ├── AuthError          credentials missing or refused
    │   ├── NotFoundError      the registry has no such repository, tag or blob
    │   ├── PlatformError      an index has no manifest for the wanted platform
    │   └── OriginUnavailable  the registry stayed unreachable or failing after retries
    ├── IntegrityError         bytes did not match their digest; nothing was published
    ├── StoreError             the local store could not do what was asked
    │   ├── DiskFullError      no space left for a download
    │   └── UnsafePathError    a file name would escape the output directory
    └── ProtocolError          the peer protocol was broken; closes that one connection
        ├── LocalProtocolError   we tried to break it: a bug or misuse on our side
        └── RemoteProtocolError  the peer broke it: bad frame, field, order or handshake

Each class carries the exit code the CLI returns for it, so scripts can tell a typo from a
dead registry from a corrupt download.
"""

from __future__ import annotations


class P2pullError(Exception):
    """Root of every error p2pull raises on purpose. The message says what happened and,
    where the user can act, what to do."""

    exit_code = 1


class UsageError(P2pullError):
    exit_code = 2


class RefError(UsageError):
    """A reference that cannot be parsed."""


class OriginError(P2pullError):
    exit_code = 3


class AuthError(OriginError):
    exit_code = 4


class NotFoundError(OriginError):
    exit_code = 5


class PlatformError(OriginError):
    exit_code = 5


class OriginUnavailable(OriginError):
    exit_code = 6


class IntegrityError(P2pullError):
    exit_code = 7


class StoreError(P2pullError):
    exit_code = 8


class DiskFullError(StoreError):
    exit_code = 9


class UnsafePathError(StoreError):
    exit_code = 10


class ProtocolError(P2pullError):
    exit_code = 11


class LocalProtocolError(ProtocolError):
    """We were about to break the peer protocol (an invalid message, or one sent in the wrong
    state). ``p2pull.wire`` turns the ones it raises while decoding into RemoteProtocolError."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: a malformed or oversize frame, a bad field, a message out
    of order, or a failed handshake. Drop that one connection and log it."""


#: The CLI's exit codes, for the README and for scripts.
EXIT_CODES = {
    0: "success",
    1: "unexpected error (a bug: please report it)",
    2: "bad input: arguments, configuration or reference",
    3: "registry error",
    4: "authentication refused or missing",
    5: "not found: repository, tag, blob or platform",
    6: "registry unreachable after retries",
    7: "integrity: downloaded bytes did not match their digest (nothing published)",
    8: "local store error",
    9: "disk full (nothing published; partial download kept for resume)",
    10: "unsafe path in an artifact (refused)",
    11: "peer protocol error",
    130: "interrupted",
}


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception to report from a nursery's group: the first P2pullError leaf (the other
    tasks were merely cancelled because of it), else the group itself."""
    leaves = []
    stack = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    for exc in leaves:
        if isinstance(exc, (P2pullError, KeyboardInterrupt)):
            return exc
    return group
