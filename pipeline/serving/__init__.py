"""Code that runs inside Triton's python-backend stub, not in the pipeline's own processes."""
