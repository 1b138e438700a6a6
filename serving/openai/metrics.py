"""The server's metrics and `/metrics` (Prometheus' text format, written by `prometheus_client`),
in a registry of this app's own, so two apps in one process keep their own counts.

The names are vLLM's where the meaning is the same, so dashboards made for vLLM read them
(https://docs.vllm.ai/en/latest/usage/metrics.html; the buckets are those of vLLM's
`v1/metrics/loggers.py`), each with the `model_name` label vLLM adds. The `kilolora_*` names, which
the server had before, stay as they were for what vLLM has no name for (KV blocks, engine steps,
adapters, cancellations); monotonic ones among them keep their names and so are typed gauges.

Everything here changes on the event loop thread only (the routes and their streams); the engine's
stats are read by an engine command (`EngineClient.stats`) and handed to `render` at each scrape.
"""

from __future__ import annotations

import time

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as err:  # pragma: no cover - the dependency is declared; this names the fix
    raise ImportError("the server's /metrics needs prometheus_client: pip install 'prometheus_client>=0.20'") from err

CONTENT_TYPE = CONTENT_TYPE_LATEST
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def buckets_1_2_5(top: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `top` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > top:
                return out
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The server's counters and histograms; `render` writes them with the engine's stats."""

    def __init__(self, model_name: str = "base", max_model_len: int = 2048):
        self.model_name = model_name
        self.running = 0
        """sequences in flight (each request counts prompts × n): what `ServerLimits.max_running` bounds"""
        self.total = 0
        """requests admitted"""
        self.errors = 0
        """error bodies sent, in a response or inside a stream"""
        self.cancelled = 0
        """requests whose client went away before the end"""
        self.engine_stats: dict = {}
        self.step_seconds = 0.0
        self.registry = CollectorRegistry()
        self.registry.register(_Snapshot(self))
        reg, label = self.registry, [model_name]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=reg).labels(*label)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["model_name"], registry=reg).labels(*label)

        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds: from "
                             "the request's arrival to its last token.", REQUEST_LATENCY_BUCKETS)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds: from "
                              "the request's arrival to its first token (a streamed request's first chunk; for a "
                              "response sent whole, when the engine made its first token).", TIME_TO_FIRST_TOKEN_BUCKETS)
        self.prompt_hist = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed (per request).",
                                     buckets_1_2_5(max_model_len))
        self.generation_hist = histogram("vllm:request_generation_tokens", "Number of generation tokens processed "
                                         "(per request, all its choices).", buckets_1_2_5(max_model_len))
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests (each choice of a "
                               "request, by its finish reason).", ["model_name", "finished_reason"], registry=reg)
        for reason in ("stop", "length"):  # the series exist before the first request ends
            self.success.labels(model_name, reason)

    # ------------------------------------------------------------- events
    def started(self, seqs: int) -> None:
        self.running += seqs
        self.total += 1

    def ended(self, seqs: int) -> None:
        self.running -= seqs

    def first_token(self, arrival: float, at: float | None = None) -> None:
        """A request's first token came out at `at` (default: now); both are `time.monotonic()`."""
        self.ttft.observe((time.monotonic() if at is None else at) - arrival)

    def finished(self, arrival: float, prompt_tokens: int, generated: int, finish_reasons: list[str | None]) -> None:
        """A request was answered in full: its latency, its tokens, each choice's finish reason."""
        self.e2e.observe(time.monotonic() - arrival)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.prompt_hist.observe(prompt_tokens)
        self.generation_hist.observe(generated)
        for r in finish_reasons:
            self.success.labels(self.model_name, r or "stop").inc()

    # ------------------------------------------------------------- /metrics
    def render(self, st: dict, step_seconds: float) -> bytes:
        """Prometheus text: the engine's `stats()` `st`, the time spent stepping, and all of the above."""
        self.engine_stats, self.step_seconds = st, step_seconds
        return generate_latest(self.registry)


class _Snapshot:
    """The values read at each scrape (prometheus_client's custom-collector protocol)."""

    def __init__(self, m: ServerMetrics):
        self.m = m

    def collect(self):
        m, st = self.m, self.m.engine_stats

        def vllm_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([m.model_name], value)
            return g

        yield vllm_gauge("vllm:num_requests_running", "Number of requests in model execution batches (sequences: "
                         "each request counts prompts × n).", m.running)
        yield vllm_gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed (always 0: past "
                         "the in-flight limit a request gets 503, it does not queue).", 0)
        if st:
            total = st["blocks_total"]
            yield vllm_gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                             st["blocks_used"] / total if total else 0.0)
            for name, key, doc in [("kv_blocks_total", "blocks_total", "KV-cache blocks in the pool."),
                                   ("kv_blocks_used", "blocks_used", "KV-cache blocks held by sequences or the prefix "
                                                                     "cache."),
                                   ("open_sequences", "open_sequences", "Engine sequences open."),
                                   ("prefix_cache_hits", "prefix_hits", "KV blocks found in the prefix cache "
                                                                        "(monotonic)."),
                                   ("engine_steps", "steps", "Engine steps run (monotonic)."),
                                   ("adapters", "adapters", "Adapters served.")]:
                yield GaugeMetricFamily("kilolora_" + name, doc, value=st[key])
        yield GaugeMetricFamily("kilolora_requests_running", "Sequences in flight (each request counts prompts × n).",
                                value=m.running)
        yield CounterMetricFamily("kilolora_requests", "Requests admitted.", value=m.total)
        yield GaugeMetricFamily("kilolora_requests_cancelled", "Requests whose client went away before the end "
                                "(monotonic).", value=m.cancelled)
        yield CounterMetricFamily("kilolora_errors", "Error bodies sent, in a response or inside a stream.",
                                  value=m.errors)
        yield GaugeMetricFamily("kilolora_engine_step_seconds", "Time spent inside engine steps (monotonic).",
                                value=m.step_seconds)
