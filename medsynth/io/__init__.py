"""Reading and writing volumes with their full geometry (NIfTI, DICOM series, MHA/NRRD)."""
