"""Benchmarks: starling-local against raw llama.cpp, on synthetic models of the real shapes."""
