"""Output formats of ``medsynth convert``, kept in a module without imports.

The argument parser offers them as ``--format`` choices; building the parser must not import the runner
(torch, pydicom), so the constant lives here and the runner imports it.
"""

FORMATS: tuple[str, ...] = ("nifti", "dicom", "both")
