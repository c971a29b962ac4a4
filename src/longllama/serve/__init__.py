"""`longllama serve`: an OpenAI-compatible HTTP server with document memories (docs/serve.md)."""

from typing import Any

from longllama.serve.config import ServeConfig

__all__ = ["APIError", "ServeConfig", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    # the app (FastAPI, uvicorn) is imported on first use: the command line reads ServeConfig without them
    if name in ("APIError", "create_app", "run_server"):
        from longllama.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
