"""Runnable end-to-end examples (``python -m nnmark.examples.NAME``); each needs its own extra."""
