"""Prometheus collectors, named after vLLM's where an equivalent exists (prefix `kvserve:`).

Per-request observations (histograms, finish-reason and rejection counters) are recorded by the
server as requests complete. Engine state (running/waiting requests, KV usage, prefix-cache and
preemption counters) is read from each engine's latest stats at scrape time by a custom
collector, so nothing has to be kept in sync. One registry per app: no module globals.

Per tenant (the `tenant` label: the keys file's tenant name, "" for the anonymous tenant; names
come only from the keys file, so the label's values are bounded): tokens served (prompt and
generated, counted as the response's usage counts them, when a request ends), the queue time
(arrival to first scheduling) of each finished choice, and rejections by reason (the error code:
tenant_concurrency, tenant_tokens_per_minute, exceeds_max_concurrent, exceeds_tokens_per_minute,
queue_full, rate_limited).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvserve.sched.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineStatsCollector(Collector):
    def __init__(self, sources: Callable[[], dict[str, SchedulerStats]]):
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("kvserve:num_requests_running", "Requests running on the engine", labels=["model_name"])
        waiting = GaugeMetricFamily("kvserve:num_requests_waiting", "Requests waiting to be scheduled", labels=["model_name"])
        usage = GaugeMetricFamily("kvserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", labels=["model_name"])
        blocks = GaugeMetricFamily("kvserve:kv_cache_blocks", "KV blocks by state", labels=["model_name", "state"])
        queries = CounterMetricFamily("kvserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=["model_name"])
        hits = CounterMetricFamily("kvserve:prefix_cache_hits", "Prompt tokens served from the prefix cache", labels=["model_name"])
        preemptions = CounterMetricFamily("kvserve:num_preemptions", "Requests preempted to free KV blocks", labels=["model_name"])
        by_mode = CounterMetricFamily("kvserve:preemptions", "Preemptions by mode: swap (KV copied to the host "
                                      "tier) or recompute", labels=["model_name", "mode"])
        swapped = CounterMetricFamily("kvserve:preemption_swapped_bytes", "KV bytes copied to the host tier by "
                                      "preemption", labels=["model_name"])
        longest = GaugeMetricFamily("kvserve:max_queue_time_seconds", "The longest wait from arrival to first "
                                    "admission since start", labels=["model_name"])
        over = GaugeMetricFamily("kvserve:max_wait_over_aging_bound_seconds", "The most a first admission came after "
                                 "aging_factor x its service estimate, since start (<= 0: all within)",
                                 labels=["model_name"])
        stalls = CounterMetricFamily("kvserve:scheduler_stalls_broken", "Steps that would have scheduled nothing "
                                     "with requests pending, planned again without fair caps or waits (a bug: "
                                     "should stay 0)", labels=["model_name"])
        computed = CounterMetricFamily("kvserve:computed_tokens", "Tokens run through the model (recomputation "
                                       "included)", labels=["model_name"])
        pinned = GaugeMetricFamily("kvserve:prompt_cache_pinned_blocks", "KV blocks held by cache checkpoints", labels=["model_name"])
        expired = CounterMetricFamily("kvserve:prompt_cache_ttl_expiries", "Checkpoint pins whose TTL ran out without a hit", labels=["model_name"])
        budget = CounterMetricFamily("kvserve:prompt_cache_pin_budget_releases",
                                     "Checkpoint pins released early to keep within the pin budget", labels=["model_name"])
        evicted = CounterMetricFamily("kvserve:prompt_cache_evictions", "Cached KV blocks dropped, by reason and tier",
                                      labels=["model_name", "reason", "tier"])
        host = CounterMetricFamily("kvserve:prompt_cache_host_hits", "KV blocks copied back from the host tier",
                                   labels=["model_name"])
        disk = CounterMetricFamily("kvserve:prompt_cache_disk_hits", "KV blocks copied back from the disk tier",
                                   labels=["model_name"])
        for name, stats in self._sources().items():
            kv = stats.kv
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            usage.add_metric([name], kv.usage)
            blocks.add_metric([name, "used"], kv.num_used_blocks)
            blocks.add_metric([name, "cached"], kv.num_cached_blocks)
            blocks.add_metric([name, "free"], kv.num_free_blocks)
            queries.add_metric([name], kv.prefix_queried_tokens)
            hits.add_metric([name], kv.prefix_hit_tokens)
            preemptions.add_metric([name], stats.num_preemptions)
            by_mode.add_metric([name, "swap"], stats.num_preemptions_swap)
            by_mode.add_metric([name, "recompute"], stats.num_preemptions_recompute)
            swapped.add_metric([name], stats.bytes_swapped_out)
            longest.add_metric([name], stats.max_queue_time_s)
            if stats.max_wait_over_aging_s != float("-inf"):
                over.add_metric([name], stats.max_wait_over_aging_s)
            computed.add_metric([name], stats.num_computed_tokens)
            stalls.add_metric([name], stats.num_stalls_broken)
            pinned.add_metric([name], kv.num_pinned_blocks)
            expired.add_metric([name], kv.pins_expired)
            evicted.add_metric([name, "lru", "device"], kv.blocks_evicted_lru)
            evicted.add_metric([name, "flush", "device"], kv.blocks_evicted_flush)
            evicted.add_metric([name, "lru", "host"], kv.blocks_evicted_host)
            evicted.add_metric([name, "lru", "disk"], kv.blocks_evicted_disk)
            budget.add_metric([name], kv.pins_released_for_budget)
            host.add_metric([name], kv.host_hit_blocks)
            disk.add_metric([name], kv.disk_hit_blocks)
        yield from (running, waiting, usage, blocks, queries, hits, preemptions, by_mode, swapped, longest, over,
                    computed, stalls, pinned,
                    expired, budget,
                    evicted, host, disk)


class BatchStatsCollector(Collector):
    """Batch jobs: lines queued (pending in active batches), running, finished; output tokens (whose
    rate is the batch tokens/s). Read at scrape time from the runner, when batch jobs are on."""

    def __init__(self, runner: Callable[[], object]):
        self._runner = runner

    def collect(self) -> Iterable[Metric]:
        runner = self._runner()
        if runner is None:
            return
        queued = GaugeMetricFamily("kvserve:batch_lines_queued", "Batch lines waiting to run")
        running = GaugeMetricFamily("kvserve:batch_lines_running", "Batch lines running as engine requests")
        finished = CounterMetricFamily("kvserve:batch_lines_finished", "Batch lines answered (since start)")
        tokens = CounterMetricFamily("kvserve:batch_output_tokens", "Output tokens of batch lines (since start)")
        queued.add_metric([], max(0, runner.store.pending_total() - runner.num_running))
        running.add_metric([], runner.num_running)
        finished.add_metric([], runner.stats.lines_finished)
        tokens.add_metric([], runner.stats.output_tokens)
        yield from (queued, running, finished, tokens)


class ReplicaRoutingCollector(Collector):
    """Scaled out (--replicas): the routing decisions of this ingress and its view of each replica,
    read at scrape time from each model's RouteBook (kvserve/cluster/book.py)."""

    def __init__(self, books: Callable[[], dict[str, object]]):
        self._books = books

    def collect(self) -> Iterable[Metric]:
        books = self._books()
        if not books:
            return
        routes = CounterMetricFamily("kvserve:replica_routes", "Requests routed to a replica, by reason: prefix "
                                     "(longest cached prefix), session (sticky), imbalance (queues too far apart: "
                                     "power of two choices), balance (no prefix held: power of two choices), pow2 "
                                     "(Ray's router)", labels=["model_name", "reason"])
        matched = CounterMetricFamily("kvserve:replica_route_matched_blocks", "Leading prompt blocks the chosen "
                                      "replica was believed to hold, summed over routes", labels=["model_name"])
        replicas = GaugeMetricFamily("kvserve:replicas", "Engine replicas serving the model", labels=["model_name"])
        in_flight = GaugeMetricFamily("kvserve:replica_in_flight", "Requests this ingress has in flight on a "
                                      "replica", labels=["model_name", "replica"])
        routed = CounterMetricFamily("kvserve:replica_routed", "Requests this ingress routed to a replica",
                                     labels=["model_name", "replica"])
        queue = GaugeMetricFamily("kvserve:replica_queue", "A replica's running + waiting requests, as it last "
                                  "reported", labels=["model_name", "replica"])
        for name, book in books.items():
            snapshot = book.snapshot()
            for reason, count in snapshot["decisions"].items():
                routes.add_metric([name, reason], count)
            matched.add_metric([name], snapshot["matched_blocks"])
            replicas.add_metric([name], len(snapshot["replicas"]))
            for replica, view in snapshot["replicas"].items():
                in_flight.add_metric([name, replica], view["in_flight"])
                routed.add_metric([name, replica], view["routed"])
                if view["queue"] is not None:
                    queue.add_metric([name, replica], view["queue"])
        yield from (routes, matched, replicas, in_flight, routed, queue)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, SchedulerStats]]):
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["model_name"]
        self.ttft = Histogram("kvserve:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("kvserve:inter_token_latency_seconds", "Time between consecutive output tokens",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("kvserve:request_queue_time_seconds", "Time waiting before first scheduled",
                                    labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve:e2e_request_latency_seconds", "End-to-end request latency",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("kvserve:request_prompt_tokens", "Prompt tokens per request",
                                       labels, buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("kvserve:request_generation_tokens", "Generated tokens per request",
                                           labels, buckets=TOKEN_BUCKETS, registry=r)
        self.finished = Counter("kvserve:request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.admitted = Counter("kvserve:requests_admitted", "Requests (choices) handed to the engine; once the "
                                "server is idle, equal to the sum of request_success", labels, registry=r)
        self.cache_read_tokens = Counter("kvserve:prompt_cache_read_tokens", "Prompt tokens read from the KV cache",
                                         labels, registry=r)
        self.cache_write_tokens = Counter("kvserve:prompt_cache_write_tokens",
                                          "Prompt tokens written and pinned by cache checkpoints", labels, registry=r)
        self.rejected = Counter("kvserve:requests_rejected", "Requests rejected before running, by reason",
                                ["reason"], registry=r)
        self.server_aborts = Counter("kvserve:server_aborts", "Requests the server aborted while they ran, by "
                                     "reason (stream_idle_timeout, websocket_stalled, shutdown)", ["reason"], registry=r)
        # Routers and cost (kvserve/routing/): model_name is the router (or model) the client named.
        self.routing_seconds = Histogram(
            "kvserve:routing_overhead_seconds", "Time routing adds to a routed answer: kind=decision is the "
            "computation, kind=holdback the wait from the small model's first token to its release or escalation",
            labels + ["kind"], buckets=(0.0001, 0.001) + LATENCY_BUCKETS, registry=r)
        self.routing_decisions = Counter("kvserve:routing_decisions", "Routed answers by the model that finished "
                                         "them and why", labels + ["answered_by", "reason"], registry=r)
        self.weighted_cost = Counter("kvserve:weighted_cost", "Weighted cost of answers: the sum over the models "
                                     "that ran of cost weight x (prompt + generated tokens)", labels, registry=r)
        self.compactions = Counter("kvserve:compactions", "Histories compacted, by whether the summary was new or "
                                   "reused from an earlier turn", labels + ["summary"], registry=r)
        # Tenants (kvserve/server/auth.py): the anonymous tenant's label is "".
        self.tenant_tokens = Counter("kvserve:tenant_tokens", "Tokens served per tenant: kind=prompt (once per "
                                     "prompt) or generation", ["tenant", "kind"], registry=r)
        self.tenant_queue_time = Histogram("kvserve:tenant_queue_time_seconds", "Time from arrival to first "
                                           "scheduled, per tenant", ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.tenant_rejections = Counter("kvserve:tenant_rejections", "Requests of a tenant refused before running, "
                                         "by reason (the error code)", ["tenant", "reason"], registry=r)
        r.register(EngineStatsCollector(engine_stats))

    def add_batch_source(self, runner: Callable[[], object]) -> None:
        self.registry.register(BatchStatsCollector(runner))

    def add_replica_source(self, books: Callable[[], dict[str, object]]) -> None:
        self.registry.register(ReplicaRoutingCollector(books))

    def render(self) -> bytes:
        return generate_latest(self.registry)
