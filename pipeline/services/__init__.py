"""The embedded default services (Redis, Triton) and the child-process supervision they share."""
