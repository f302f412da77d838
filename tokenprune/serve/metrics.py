"""Prometheus text-format metrics (exposition format 0.0.4) without a client library.

Counters and histograms are thread-safe; ``render()`` gives the ``/metrics`` body.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    esc = [str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values]
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from a callable."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self._header() + [f"{self.name} {_num(self.read())}"]


class Histogram(_Metric):
    """Cumulative buckets, sum and count per label set."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count
        if not self.labels:
            self._data[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labels)
        with self._lock:
            d = self._data.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> float:
        d = self._data.get(tuple(str(labels[n]) for n in self.labels))
        return d[-1] if d else 0.0

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for key, d in items:
            for i, b in enumerate(self.buckets):
                lab = _labels((*self.labels, "le"), (*key, _num(b)))
                lines.append(f"{self.name}_bucket{lab} {_num(d[i])}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(d[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {_num(d[-1])}")
        return lines


class ServerMetrics:
    """Every metric the server exports, prefixed ``tokenprune_``."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        p = "tokenprune_"
        self.requests = Counter(p + "requests_total", "Chat-completion requests answered, by outcome.", ["status"])
        self.errors = Counter(p + "request_errors_total", "Requests answered with an error, by HTTP status.", ["code"])
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens (visual tokens included, unpruned).")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Generated tokens.")
        self.visual_tokens = Counter(p + "visual_tokens_total", "Visual tokens before reduction.", ["method"])
        self.kept_tokens = Counter(
            p + "kept_visual_tokens_total", "Visual tokens kept after the last reduction stage.", ["method"]
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Request arrival to first generated token.", LATENCY_BUCKETS
        )
        self.latency = Histogram(
            p + "request_latency_seconds", "Request arrival to last token (end to end).", LATENCY_BUCKETS
        )
        self.batch_size = Histogram(p + "batch_size", "Requests per batched generate call.", BATCH_BUCKETS)
        self.batch_seconds = Histogram(p + "batch_seconds", "Wall time of one batched generate call.", LATENCY_BUCKETS)
        self.queue = Gauge(p + "queue_depth", "Requests waiting for a batch.", queue_depth)
        self.all = [
            self.requests, self.errors, self.prompt_tokens, self.completion_tokens, self.visual_tokens,
            self.kept_tokens, self.ttft, self.latency, self.batch_size, self.batch_seconds, self.queue,
        ]  # fmt: skip

    def render(self) -> str:
        """The ``/metrics`` body."""
        return "\n".join(line for m in self.all for line in m.render()) + "\n"
