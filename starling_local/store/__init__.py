"""Saved conversations in SQLite."""
