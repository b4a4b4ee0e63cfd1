"""LLM provider adapters and the fake provider server."""
