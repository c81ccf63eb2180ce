"""Benchmarks that measure the pipeline side by side with reference tools."""
