"""The HTTP server: OpenAI-compatible API, SSE and WebSocket streaming, metrics."""
