"""The one root of the errors RadBridge raises on purpose.

Every error the engine means to raise derives from ``RadBridgeError``, so a caller can tell "the
input or the configuration is wrong, and this says how" from a bug. Each subclass lives next to the
code that raises it and knows how its peer is told: an HL7 ERR segment (``HL7Error``), a DICOM
status with an Error Comment (``HeaderError``), an OperationOutcome (``FhirError``), a
``file:line: field: message`` list (``ConfigFileError``). Their texts never carry SQL or patient
values beyond what the peer itself sent.
"""

from __future__ import annotations


class RadBridgeError(Exception):
    """Base class of the errors RadBridge raises on purpose."""
