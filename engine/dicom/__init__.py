"""DICOM pieces independent of the network: headers, statuses, C-FIND matching."""
