"""The llama.cpp runtime (through llama-cpp-python)."""
