"""Synthetic training data the project generates itself (the embedded demo needs no downloads)."""
