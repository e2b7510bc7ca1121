"""Bytes on disk: safetensors headers, atomic writes, file digests, the cache folder, shared file formats.

Nothing here knows about models beyond the checkpoint layout; every other layer writes through it.
"""
