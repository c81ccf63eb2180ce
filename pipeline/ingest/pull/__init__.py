"""Pulling studies from a PACS: find, retrieve, and hand over like received ones."""
