"""The HTTP server: OpenAI's completions API over the decode engine, with continuous batching
(``scheduler``: one engine thread, a bounded queue, admission and cancellation between steps)."""
