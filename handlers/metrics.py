"""Prometheus metrics, declared once, exported from every worker through one scrape target.

Why not TorchServe's custom metrics: its frontend renders histograms with fixed 5 ms-10 s buckets, too
coarse for LaFAM (tens of microseconds). Instead every worker process records into prometheus-client's
multiprocess store (memory-mapped files in one folder per server), and one exporter serves the sum of
all workers of all models. The exporter lives inside the workers themselves: each worker tries to bind
the exporter address; the one that succeeds serves, the others retry every few seconds, so when the
serving worker dies another one takes over and the scrape target survives worker restarts with no
extra process to run. Counts of dead workers stay in the sums (counters never go backwards).

Importing this module changes nothing outside it: the metrics below are in no registry and, until
:func:`configure` is called, record into this process's memory (prometheus-client's default storage), which
:func:`render` shows. That is all offline users (evaluation, benchmarks, the offline CLI) need. A worker
calls :func:`configure` once when it starts (``LafamHandler.initialize``), before its first request; from
then on every metric is recorded into the multiprocess folder that the exporter sums.

Environment (read by :func:`configure` for what it is not given; workers inherit TorchServe's environment):
    LAFAM_METRICS_ADDRESS: ``host:port`` of the exporter (default ``127.0.0.1:8083``), ``off`` to disable.
    LAFAM_METRICS_DIR: the multiprocess folder (default: ``PROMETHEUS_MULTIPROC_DIR``, else a folder per
        TorchServe frontend process in the temp dir). In containers point it at an emptyDir that starts empty.

Recording never fails a request: an error while recording is logged and swallowed.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.exposition import start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8083"
RETRY_SECONDS = 5.0

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
    registry=None,
)
INFERENCE_SECONDS = Histogram(
    "lafam_inference_seconds",
    "Time of one batched forward pass, in seconds.",
    ["model", "backend"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
PREPROCESS_SECONDS = Histogram(
    "lafam_preprocess_seconds",
    "Time to decode, resize and normalise one request's image, in seconds.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
BATCH_SIZE = Histogram(
    "lafam_batch_size",
    "Requests per batch handed to the worker by TorchServe.",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=None,
)
SHARE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""Buckets of the drift statistics, which all lie in [0, 1]."""
MAP_ENTROPY = Histogram(
    "lafam_map_entropy_ratio",
    "Normalised entropy of each served map's positive evidence (0 = one location, 1 = uniform).",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
    registry=None,
)
MAP_BORDER = Histogram(
    "lafam_map_border_ratio",
    "Share of each served map's positive evidence on the map's outer ring.",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
    registry=None,
)
MAP_PEAK_OFFSET = Histogram(
    "lafam_map_peak_offset_ratio",
    "Distance of each served map's peak from the centre, as a fraction of the half-diagonal.",
    ["model", "method"],
    buckets=SHARE_BUCKETS,
    registry=None,
)
REQUESTS = Counter("lafam_requests", "Requests handled, by HTTP status class.", ["model", "status"], registry=None)
EXPLANATIONS = Counter("lafam_explanations", "Explanation maps served.", ["model", "method"], registry=None)
ERRORS = Counter("lafam_errors", "Failed requests, by error code.", ["model", "code"], registry=None)

DECLARED: tuple[Histogram | Counter, ...] = (
    EXPLANATION_SECONDS,
    INFERENCE_SECONDS,
    PREPROCESS_SECONDS,
    BATCH_SIZE,
    MAP_ENTROPY,
    MAP_BORDER,
    MAP_PEAK_OFFSET,
    REQUESTS,
    EXPLANATIONS,
    ERRORS,
)
"""Every metric above. None is in prometheus-client's default registry: :func:`registry` collects them."""


_children: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}
"""``(id(metric), labels)`` → the metric's labelled child: prometheus-client's ``labels()`` validates and sorts
the labels and takes a lock on every call, about half the cost of recording a value. Dropped by
:func:`configure`, which replaces every child."""


def _child(metric: Histogram | Counter, labels: dict[str, str]) -> Any:
    key = (id(metric), tuple(labels.items()))
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(**labels)
    return child


def observe(histogram: Histogram, seconds: float, **labels: str) -> None:
    """Record one value into a histogram; never raises."""
    try:
        _child(histogram, labels).observe(seconds)
    except Exception:  # a metrics failure must not fail the request
        logger.exception("could not record %s", histogram)


def count(counter: Counter, amount: float = 1.0, **labels: str) -> None:
    """Increment a counter; never raises."""
    try:
        _child(counter, labels).inc(amount)
    except Exception:
        logger.exception("could not record %s", counter)


def _STOP() -> None:  # noqa: N802 - a sentinel, never called
    """Handed to the metrics thread at exit: it ends there."""


LATER_POLL_SECONDS = 0.05
"""How often the metrics thread looks for work while it has none (20 light wake-ups a second per process)."""


class _Later:
    """One background thread per process that runs what :func:`later` hands it, in order.

    Handing over is a deque append, with no wake-up: waking a thread blocked on a queue is a system call and a
    cross-core wake, 20-25 µs right after a forward pass, on the request's path. The thread looks for work every
    :data:`LATER_POLL_SECONDS` instead, so values reach the metrics at most that late; :meth:`settle` and exit
    wake it at once.
    """

    def __init__(self) -> None:
        self._items: collections.deque[tuple[Callable[..., object], tuple[object, ...]]] = collections.deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def hand(self, function: Callable[..., object], args: tuple[object, ...]) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lafam-metrics-writer", daemon=True)
                    self._thread.start()
                    atexit.register(self._stop)
        self._items.append((function, args))  # atomic under the GIL

    def _run(self) -> None:
        while True:
            try:
                function, args = self._items.popleft()
            except IndexError:  # nothing to do: sleep until woken or the next look
                self._wake.wait(LATER_POLL_SECONDS)
                self._wake.clear()  # anything handed before a wake-up is in the deque already
                continue
            if function is _STOP:
                return
            try:
                function(*args)
            except Exception:  # recording never fails anything
                logger.exception("deferred metrics recording failed")

    def _stop(self, timeout: float = 5.0) -> None:
        """At exit: run what is queued, then end the thread.

        Before the interpreter (and torch's and ONNX Runtime's thread pools) is torn down under it: a daemon
        thread caught inside a torch call then aborts the process ("terminate called without an active
        exception").
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.hand(_STOP, ())
            self._wake.set()
            thread.join(timeout)

    def settle(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        reached = threading.Event()
        self.hand(reached.set, ())  # first in, first out: when it runs, everything handed before it has run
        self._wake.set()
        return reached.wait(timeout)


_later = _Later()


def later(function: Callable[..., object], *args: object) -> None:
    """Run ``function(*args)`` on this process's metrics thread, after the current request has its answer.

    For recording that a client need not wait for (the explanation's metrics and drift statistics): handing
    it over costs a queue put, where writing a histogram into the multiprocess files right after a forward
    pass costs several cold-cache microseconds per value. The thread starts on first use; what it has not run
    when the process exits is lost (a few values); an exception is logged, never raised.
    """
    _later.hand(function, args)


def settle(timeout: float = 10.0) -> bool:
    """Wait until everything handed to :func:`later` so far has run; ``False`` if ``timeout`` passed first."""
    return _later.settle(timeout)


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Time the ``with`` block into ``histogram`` (recorded even when the block raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe(histogram, time.perf_counter() - start, **labels)


def registry() -> CollectorRegistry:
    """Return a registry holding the sum of every worker's metrics (this process's alone before :func:`configure`).

    What :func:`later` holds so far is recorded first, so a read right after a request sees its explanation.
    """
    settle()
    collected = CollectorRegistry()
    if _configured:
        MultiProcessCollector(collected, path=str(_configured[0].directory))
    else:
        for metric in DECLARED:
            collected.register(metric)
    return collected


def render() -> bytes:
    """Return the Prometheus text exposition of :func:`registry`."""
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


def default_directory() -> Path:
    """``LAFAM_METRICS_DIR``, else ``PROMETHEUS_MULTIPROC_DIR``, else a folder per TorchServe frontend in the temp dir.

    A worker's parent is the TorchServe frontend, so the workers of one server share the folder.
    """
    configured = os.environ.get("LAFAM_METRICS_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"lafam-serve-metrics-{os.getppid()}"


def _environment_address() -> tuple[str, int] | None:
    return parse_address(os.environ.get("LAFAM_METRICS_ADDRESS", DEFAULT_ADDRESS))


@dataclass(frozen=True)
class Configuration:
    """Where this process's metrics go, as :func:`configure` set it.

    Attributes:
        directory: the multiprocess folder every worker of the server records into.
        exporter: ``(host, port)`` the exporter competes for; ``None``: no exporter.
    """

    directory: Path
    exporter: tuple[str, int] | None


_configure_lock = threading.Lock()
_configured: list[Configuration] = []


def configuration() -> Configuration | None:
    """Return the configuration in force, ``None`` before :func:`configure` (metrics in process memory)."""
    return _configured[0] if _configured else None


def configure(directory: str | os.PathLike[str] | None = None, address: str | None = None) -> Configuration:
    """Record this process's metrics into the multiprocess folder shared by every worker; idempotent.

    A worker calls it once when it starts, before its first request. The first call creates the folder,
    sets ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client knows the folder by that variable only) and
    switches prometheus-client's storage to memory-mapped files in it; values recorded in memory before
    are dropped. A later call changes nothing: what it leaves out keeps the configuration in force, and what
    it gives must agree with it (files already mapped cannot move).

    Args:
        directory: the multiprocess folder, created if missing; default :func:`default_directory`.
        address: ``host:port`` the exporter competes for, or ``off``; default ``LAFAM_METRICS_ADDRESS``,
            else :data:`DEFAULT_ADDRESS`. Read by :func:`start_exporter`.

    Returns:
        The configuration in force.

    Raises:
        ValueError: the address is malformed, or differs, as does the folder, from the configuration in force.
        OSError: the folder cannot be created.
    """
    with _configure_lock:
        if _configured:
            current = _configured[0]
            asked = Configuration(
                current.directory if directory is None else Path(directory).absolute(),
                current.exporter if address is None else parse_address(address),
            )
            if asked != current:
                raise ValueError(f"metrics are already configured as {current}; cannot switch to {asked}")
            return current
        folder = Path(default_directory() if directory is None else directory).absolute()
        configured = Configuration(folder, _environment_address() if address is None else parse_address(address))
        folder.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # it warns that files are not cleared: only in-memory children are
            warnings.filterwarnings("ignore", "Clearing labels", UserWarning)
            for metric in DECLARED:
                metric.clear()  # label children made so far hold in-memory values; new ones map the files
            _children.clear()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        if values.ValueClass is values.MutexValue:
            values.ValueClass = values.MultiProcessValue()
        _configured.append(configured)
        return configured


_exporter_lock = threading.Lock()
_exporter_threads: list[threading.Thread] = []


def start_exporter(address: str | None = None, retry_seconds: float = RETRY_SECONDS) -> bool:
    """Start (once per process) the background thread that competes for the exporter address.

    Call it after :func:`configure`: the exporter serves :func:`registry` as it was when it started.

    Args:
        address: ``host:port`` or ``off``; default: the configured one (:func:`configure`), else
            ``LAFAM_METRICS_ADDRESS``, else :data:`DEFAULT_ADDRESS`.
        retry_seconds: pause between bind attempts while another worker holds the address.

    Returns:
        ``True`` if a thread was started, ``False`` when disabled or already started.
    """
    if address is not None:
        target = parse_address(address)
    elif _configured:
        target = _configured[0].exporter
    else:
        target = _environment_address()
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
