"""`longllama serve`: an OpenAI-compatible HTTP server with document memories (docs/serve.md)."""

from longllama.serve.app import APIError, ServeConfig, create_app

__all__ = ["APIError", "ServeConfig", "create_app"]
