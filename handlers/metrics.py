"""Prometheus metrics, declared once, exported from every worker through one scrape target.

Why not TorchServe's custom metrics: its frontend renders histograms with fixed 5 ms-10 s buckets, too
coarse for LaFAM (tens of microseconds). Instead every worker process records into prometheus-client's
multiprocess store (memory-mapped files in one folder per server), and one exporter serves the sum of
all workers of all models. The exporter lives inside the workers themselves: each worker tries to bind
the exporter address; the one that succeeds serves, the others retry every few seconds, so when the
serving worker dies another one takes over and the scrape target survives worker restarts with no
extra process to run. Counts of dead workers stay in the sums (counters never go backwards).

Environment (read by the workers, which inherit TorchServe's environment):
    LAFAM_METRICS_ADDRESS: ``host:port`` of the exporter (default ``127.0.0.1:8083``), ``off`` to disable.
    LAFAM_METRICS_DIR: the multiprocess folder (default: a folder per TorchServe frontend process in the
        temp dir). In containers point it at an emptyDir that starts empty.

Recording never fails a request: an error while recording is logged and swallowed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8083"
RETRY_SECONDS = 5.0


def _metrics_dir() -> Path:
    configured = os.environ.get("LAFAM_METRICS_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"lafam-serve-metrics-{os.getppid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# prometheus-client picks its storage when first imported: the folder must be known before that.
METRICS_DIR = _metrics_dir()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values  # noqa: E402
from prometheus_client.exposition import start_http_server  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

if values.ValueClass is values.MutexValue:  # imported before us without the folder: switch it over
    values.ValueClass = values.MultiProcessValue()

# From 50 µs (a LaFAM reduction on a small model) to 10 s (a backward pass on a big one on CPU).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

EXPLANATION_SECONDS = Histogram(
    "lafam_explanation_seconds",
    "Time to compute and encode one request's explanation map, in seconds.",
    ["model", "method"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "lafam_inference_seconds",
    "Time of one batched forward pass, in seconds.",
    ["model", "backend"],
    buckets=LATENCY_BUCKETS,
)
PREPROCESS_SECONDS = Histogram(
    "lafam_preprocess_seconds",
    "Time to decode, resize and normalise one request's image, in seconds.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "lafam_batch_size", "Requests per batch handed to the worker by TorchServe.", ["model"], buckets=BATCH_BUCKETS
)
SHARE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""Buckets of the drift statistics, which all lie in [0, 1]."""
MAP_ENTROPY = Histogram(
    "lafam_map_entropy_ratio",
    "Normalised entropy of each served map's positive evidence (0 = one location, 1 = uniform).",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
)
MAP_BORDER = Histogram(
    "lafam_map_border_ratio",
    "Share of each served map's positive evidence on the map's outer ring.",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
)
MAP_PEAK_OFFSET = Histogram(
    "lafam_map_peak_offset_ratio",
    "Distance of each served map's peak from the centre, as a fraction of the half-diagonal.",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
)
REQUESTS = Counter("lafam_requests", "Requests handled, by HTTP status class.", ["model", "status"])
EXPLANATIONS = Counter("lafam_explanations", "Explanation maps served.", ["model", "method"])
ERRORS = Counter("lafam_errors", "Failed requests, by error code.", ["model", "code"])


def observe(histogram: Histogram, seconds: float, **labels: str) -> None:
    """Record one value into a histogram; never raises."""
    try:
        histogram.labels(**labels).observe(seconds)
    except Exception:  # a metrics failure must not fail the request
        logger.exception("could not record %s", histogram)


def count(counter: Counter, amount: float = 1.0, **labels: str) -> None:
    """Increment a counter; never raises."""
    try:
        counter.labels(**labels).inc(amount)
    except Exception:
        logger.exception("could not record %s", counter)


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Time the ``with`` block into ``histogram`` (recorded even when the block raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe(histogram, time.perf_counter() - start, **labels)


def registry() -> CollectorRegistry:
    """Return a registry holding the sum of every worker's metrics."""
    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=str(METRICS_DIR))
    return collected


def render() -> bytes:
    """Return the Prometheus text exposition of every worker's metrics."""
    return generate_latest(registry())


def parse_address(address: str) -> tuple[str, int] | None:
    """Parse ``host:port``; ``off``/empty → ``None``.

    Raises:
        ValueError: the address is malformed.
    """
    address = address.strip()
    if address.lower() in ("", "off", "none", "false", "0"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"LAFAM_METRICS_ADDRESS must be host:port or 'off', got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_exporter_lock = threading.Lock()
_exporter_threads: list[threading.Thread] = []


def start_exporter(address: str | None = None, retry_seconds: float = RETRY_SECONDS) -> bool:
    """Start (once per process) the background thread that competes for the exporter address.

    Args:
        address: ``host:port`` or ``off``; default from ``LAFAM_METRICS_ADDRESS``.
        retry_seconds: pause between bind attempts while another worker holds the address.

    Returns:
        ``True`` if a thread was started, ``False`` when disabled or already started.
    """
    target = parse_address(address if address is not None else os.environ.get("LAFAM_METRICS_ADDRESS", DEFAULT_ADDRESS))
    if target is None:
        return False
    with _exporter_lock:
        if _exporter_threads:
            return False
        thread = threading.Thread(
            target=_serve_when_free, args=(target, retry_seconds), name="lafam-metrics", daemon=True
        )
        _exporter_threads.append(thread)
    thread.start()
    return True


def _serve_when_free(target: tuple[str, int], retry_seconds: float) -> None:
    host, port = target
    while True:
        try:
            start_http_server(port, addr=host, registry=registry())
        except OSError:
            time.sleep(retry_seconds)  # another worker serves; take over if it goes away
            continue
        logger.info("serving Prometheus metrics of all workers on http://%s:%d/metrics", host, port)
        return
