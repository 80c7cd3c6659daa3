"""starling-local: run the Starling-LM-7B chat models locally, template-correct to the token."""

__version__ = "0.1.0"
