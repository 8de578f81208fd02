"""RadBridge: an imaging integration engine (HL7 v2, FHIR R4, DICOM)."""

__version__ = "0.1.0"
