"""The `dicom-pipeline` command line: one module per command group, thin wrappers."""
