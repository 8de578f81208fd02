"""The one root of the errors RadBridge raises on purpose.

Every error the engine means to raise derives from ``RadBridgeError``, so a caller can tell "the
input or the configuration is wrong, and this says how" from a bug. Each subclass lives next to the
code that raises it and knows how its peer is told: an HL7 ERR segment (``HL7Error``), a DICOM
status with an Error Comment (``HeaderError``), an OperationOutcome (``FhirError``), a
``file:line: field: message`` list (``ConfigFileError``). Their texts never carry SQL or patient
values beyond what the peer itself sent.
"""

from __future__ import annotations

import logging
import secrets


class RadBridgeError(Exception):
    """Base class of the errors RadBridge raises on purpose."""


def failure_kind(exc: BaseException) -> str:
    """The class of an unexpected failure, for a peer: the database driver's own class under
    SQLAlchemy's wrapper (``UniqueViolation``, ``DataError``), else the exception's."""
    orig = getattr(exc, "orig", None)
    return type(orig if isinstance(orig, BaseException) else exc).__name__


def report_failure(logger: logging.Logger, exc: BaseException, what: str, *args: object) -> str:
    """Log an unexpected failure with all its detail under a short reference, and return what a peer
    may be told: ``KIND, ref REF``. Never the exception's text: a database error's text holds the SQL
    statement and its parameters, which are patient data."""
    ref = secrets.token_hex(4)
    logger.error(what + " [ref %s]", *args, ref, exc_info=exc)
    return f"{failure_kind(exc)}, ref {ref}"


def failure_detail(exc: BaseException) -> str:
    """The failure's own text for the engine's store (not for a peer): the driver's message without
    SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None)
    return str(orig if isinstance(orig, BaseException) else exc).strip()[:2000]
