"""Prometheus metrics of one server (``GET /metrics``).

The speculative-decoding counters carry the names vLLM exports
(``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``,
``..._num_accepted_tokens_per_pos``), so dashboards built for vLLM read them; a token is a
byte. The rest are this server's own. Each server has its own registry (several servers
in one process, as in the tests, count apart).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from bytemtp.decode.batch import GenerationStats


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no ``*_created`` timestamp beside every counter: dashboards do not read them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bytemtp_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.bytes = Counter("bytemtp_generated_bytes", "Bytes generated", registry=r)
        self.forwards = Counter("bytemtp_forwards", "Decoding forwards (engine steps)", registry=r)
        self.queue = Gauge("bytemtp_queue_depth", "Choices waiting for a row", registry=r)
        self.running = Gauge("bytemtp_running_rows", "Rows decoding", registry=r)
        self.step_seconds = Histogram(
            "bytemtp_step_seconds", "Wall time of an engine step", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Steps that verified drafts", registry=r)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft bytes verified", registry=r)
        self.accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft bytes accepted", registry=r)
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Draft bytes accepted by draft position",
            ["position"], registry=r,
        )

    def finished(self, stats: GenerationStats) -> None:
        """Count a finished row's bytes and speculation."""
        self.bytes.inc(stats.bytes)
        if stats.drafted:
            self.drafts.inc(stats.attempted[0])  # steps whose verification reached a first draft
            self.draft_tokens.inc(stats.drafted)
            self.accepted_tokens.inc(sum(stats.accepted))
            for j, a in enumerate(stats.accepted):
                self.accepted_per_pos.labels(position=str(j)).inc(a)

    def text(self) -> bytes:
        return generate_latest(self.registry)
