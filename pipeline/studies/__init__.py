"""One job on the worker, start to finish: a DICOM study, or a single dropped file."""
