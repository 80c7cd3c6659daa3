"""Getting models: GGUF checks, conversion, quantization (and, later, downloads)."""
