"""DICOM networking at the edge: the receiver (SCP) and the sender (SCU), over pynetdicom."""
