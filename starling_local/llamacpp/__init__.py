"""llama.cpp as a library: this machine's backend and threads, and where llama.cpp logs.

A base package, below both the engine and acquisition (quantizing logs through it too).
"""
