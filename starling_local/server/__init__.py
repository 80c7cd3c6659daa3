"""`starling serve`: the OpenAI-compatible HTTP front end."""
