"""dicom-pipeline: inbox and DICOM studies -> Celery on Redis -> NVIDIA Triton -> results."""

__version__ = "0.1.0"
