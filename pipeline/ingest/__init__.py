"""Studies coming in: the inbox watcher (settling, unpacking), the DICOM receiver (C-STORE,
MPPS, STOW-RS), study completion, and the hand-over of complete studies to the queue."""
