"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ServeMetrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.max_batch = max_batch
        r = self.registry
        self.requests = Counter(
            "loom_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("loom_prompt_tokens", "Prompt tokens served", registry=r)
        self.generation_tokens = Counter("loom_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "loom_time_to_first_token_seconds",
            "From arrival to the first sampled token, per sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sequence_latency = Histogram(
            "loom_sequence_latency_seconds",
            "From arrival to the last token, per finished sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "loom_request_latency_seconds",
            "HTTP request duration, per endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished_sequences = Counter(
            "loom_finished_sequences",
            "Sequences that ended, by reason (stop, length, abort: client gone, error)",
            ["reason"],
            registry=r,
        )
        self.preemptions = Counter(
            "loom_preemptions",
            "Sequences evicted from a full KV cache (recomputed later)",
            registry=r,
        )
        self.queue_time = Histogram(
            "loom_queue_seconds",
            "From arrival to a place in the running batch, per sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "loom_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache",
            registry=r,
        )
        self.prefix_cache_query_tokens = Counter(
            "loom_prefix_cache_query_tokens",
            "Tokens of the sequences started (hit rate: hit tokens / these)",
            registry=r,
        )
        self.spec_proposed_tokens = Counter(
            "loom_spec_proposed_tokens",
            "Tokens proposed by speculative decoding (--speculate)",
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            "loom_spec_accepted_tokens",
            "Proposed tokens the model accepted (acceptance rate: accepted / proposed)",
            registry=r,
        )
        self.queue_depth = Gauge("loom_queue_depth", "Sequences waiting for a slot", registry=r)
        self.running = Gauge("loom_running_sequences", "Sequences in the batch", registry=r)
        self.batch_occupancy = Gauge(
            "loom_batch_occupancy", "Running sequences / --max-batch", registry=r
        )
        self.kv_blocks_used = Gauge("loom_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.step_tokens = Histogram(
            "loom_step_tokens",
            "Tokens of one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )

    # -- the engine's EngineMetrics ----------------------------------------------------------

    def step(self, running: int, waiting: int, blocks_used: int, tokens: int) -> None:
        self.running.set(running)
        self.queue_depth.set(waiting)
        self.batch_occupancy.set(running / self.max_batch)
        self.kv_blocks_used.set(blocks_used)
        if tokens:
            self.step_tokens.observe(tokens)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def admitted(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_query_tokens.inc(prompt_tokens)
        self.prefix_cache_hit_tokens.inc(hit_tokens)

    def speculated(self, proposed: int, accepted: int) -> None:
        self.spec_proposed_tokens.inc(proposed)
        self.spec_accepted_tokens.inc(accepted)

    def finished(
        self, reason: str, seconds: float, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.finished_sequences.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if reason in ("stop", "length"):
            self.sequence_latency.observe(seconds)

    def preempted(self) -> None:
        self.preemptions.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
