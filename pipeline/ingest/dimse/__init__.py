"""pynetdicom's internals, patched for speed: imported by the SCP alone."""
