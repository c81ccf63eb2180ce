"""Models served by Triton: the client, shared memory, segmentation, bundle import."""
