"""Where DICOM files live. The index (database) knows them by storage key only."""
