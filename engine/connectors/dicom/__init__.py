"""The DICOM connector: a pynetdicom SCP for storage, query/retrieve and modality worklist."""
