"""Images and DICOM series to tensors and volumes, and their preprocessing."""
