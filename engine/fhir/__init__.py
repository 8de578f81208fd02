"""FHIR R4: the inbound REST endpoint, its resources and the paths mapping files use."""
