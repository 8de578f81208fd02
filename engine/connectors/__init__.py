"""Connectors: how messages enter and leave (MLLP now; HTTP FHIR and DICOM later)."""
