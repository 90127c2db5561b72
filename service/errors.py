"""The one error type of the domain: a refused operation names the field at fault and the problem with it.

No HTTP here: `kind` says what sort of refusal it is and `service.api` maps each kind to a status code
(invalid 422, not found 404, conflict 409, not ready 503) and a `{"detail": {"field", "problem"}}` body.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorKind(StrEnum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    NOT_READY = "not_ready"


class DomainError(Exception):
    """A refused operation: `field` names what is wrong, `problem` says what."""

    kind: ClassVar[ErrorKind] = ErrorKind.INVALID

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidRequest(DomainError):
    """The input is wrong (a value out of range, an unknown model)."""

    kind = ErrorKind.INVALID


class NotFound(DomainError):
    """The named object does not exist."""

    kind = ErrorKind.NOT_FOUND


class Conflict(DomainError):
    """The request is valid but the current state refuses it (another rollout is active)."""

    kind = ErrorKind.CONFLICT


class NotReady(DomainError):
    """The service cannot answer yet (indices loading, no model serving); a retry later may succeed."""

    kind = ErrorKind.NOT_READY
