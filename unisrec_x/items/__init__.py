"""Frozen text encoder and the on-disk cache of item text vectors."""
