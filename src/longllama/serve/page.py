"""The web page served at `/`: one self-contained HTML file (no build step, no external assets)."""

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>longllama serve</title></head>
<body><p>longllama serve: the OpenAI-compatible API is under /v1 (docs/serve.md).</p></body></html>
"""
