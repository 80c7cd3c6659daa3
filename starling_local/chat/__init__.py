"""Conversation logic: the OpenChat 3.5 template and the context budget."""
