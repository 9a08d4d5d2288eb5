"""The HTTP server: OpenAI's completions API over the decode engine, with continuous batching
(``engine_core``: the engine in a process of its own, admitting and retiring rows between
steps; ``scheduler``: the event loop's side of it, a bounded queue and cancellation)."""
