"""Data sources. ``embedded``: text that ships with every Python, byte-tokenized (no download)."""
