"""GGUF files: reading headers, checking that a file can run, editing metadata.

A base package: it imports no layer, and the engine and acquisition both use it.
"""
