"""What a result becomes: result files, DICOM SR and SEG, their validation, previews."""
