"""What a result becomes: result files, DICOM objects (SR, SEG, key images, presentation state,
KOS, PDF report), their validation, previews."""
