"""The shared vocabulary, no frameworks: settings, jobs and the spool, received instances,
routing rules, the model contract, result documents, file kinds, atomic file writes, stage
logging and the error hierarchy."""
