"""LaFAM's overhead: handler latency with the map vs without, measured side by side in one process.

Same model, same requests, same service object; only the ``format`` option differs (``png`` → map
computed, upsampled to the input size and PNG-encoded; ``none`` → no map). The two variants alternate
(ABAB...) so that drift of a noisy machine hits both alike, and the figure reported is the median of
the per-pair ratios. That difference of two ~50 ms calls cannot resolve a few tenths of a percent on a noisy
2-core machine, so the map's cost is also measured directly inside the same calls: the time spent in the
service's explanation step (scaling the runtime's channel mean, upsampling it and PNG-encoding it for each
request) as a share
of the whole call, the median over the calls with the map ("direct" column). The explanation's metrics and drift
statistics (on, as served by default) are recorded into prometheus-client's multiprocess files as in a worker,
on the worker's metrics thread after the answer: timed apart ("after the answer" column). The channel mean is
computed by the runtime in the same pass (handlers.fused), for requests with and without the map alike: its
cost is timed inside the pass (:func:`fused_seconds`; "in graph" column, as a share of the handler's latency);
LaFAM's overhead is the sum of the two ("total", the target's figure).
Run: ``python -m benchmarks.lafam_overhead [--write benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._report import cpu_name, section, write_section
from export.exporter import export_model
from handlers import encode as encode_module
from handlers import metrics
from handlers.backends import load_backend, session_options
from handlers.manifest import Manifest
from handlers.service import LafamService, Request

RESULTS_MARKER = "<!-- lafam-overhead -->"


def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _requests(batch: int, fmt: str) -> list[Request]:
    return [
        Request(parameters={"body": _jpeg(i)}, headers={"x-lafam-format": fmt}, content_types={"body": "image/jpeg"})
        for i in range(batch)
    ]


def _paired(
    run_a: Callable[[], object],
    run_b: Callable[[], object],
    pairs: int,
    warmup: int = 2,
    explain_share: list | None = None,
) -> dict[str, float]:
    """Alternate ``run_a`` and ``run_b`` (ABAB..., order flipped each pair); medians and the median ratio a/b.

    ``explain_share``: the explanation seconds :func:`timed_explanations` collected; each ``run_a``'s share of
    them in its own time is appended to ``direct``.
    """
    for _ in range(warmup):
        run_a()
        run_b()
    a_times, b_times, ratios, direct = [], [], [], []
    for index in range(pairs):
        times = {}
        for name, run in (("a", run_a), ("b", run_b)) if index % 2 == 0 else (("b", run_b), ("a", run_a)):
            spent_before = sum(explain_share or ())
            start = time.perf_counter()
            run()
            times[name] = time.perf_counter() - start
            if name == "a" and explain_share is not None:
                direct.append((sum(explain_share) - spent_before) / times["a"])
        a_times.append(times["a"])
        b_times.append(times["b"])
        ratios.append(times["a"] / times["b"])
    return {
        "with": statistics.median(a_times),
        "without": statistics.median(b_times),
        "ratio": statistics.median(ratios),
        "direct": statistics.median(direct) if direct else float("nan"),
    }


def timed_explanations(service: LafamService) -> tuple[list[float], list[float]]:
    """Time every call of the service's explanation step, and of the recording it hands to the metrics thread.

    The step (``LafamService._explanation``) takes the map, upsamples and PNG-encodes it: everything a
    request with a map does that one without does not, before its answer. Its metrics and drift statistics
    are recorded after the answer, on the metrics thread (``LafamService._record``): timed apart.
    """
    spent: list[float] = []
    deferred: list[float] = []

    def timing(original: Callable[..., object], into: list[float]) -> Callable[..., object]:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - start)

        return timed

    service._explanation = timing(service._explanation, spent)  # type: ignore[method-assign]
    service._record = timing(service._record, deferred)  # type: ignore[method-assign]
    return spent, deferred


def _answer(service: LafamService, requests: list[Request]) -> None:
    replies = service.predict(requests)
    if any(reply.status != 200 for reply in replies):
        raise RuntimeError(f"benchmark request failed: {replies[0].body}")


def measure(service: LafamService, batch: int, pairs: int) -> dict[str, float]:
    """Median seconds per batch with and without the map, the median paired ratio, the direct share and the
    median seconds per map of the recording done on the metrics thread."""
    with_map, without_map = _requests(batch, "png"), _requests(batch, "none")
    spent, deferred = timed_explanations(service)
    try:
        result = _paired(
            lambda: _answer(service, with_map),
            lambda: _answer(service, without_map),
            pairs,
            explain_share=spent,
        )
        metrics.settle()
        return {**result, "deferred": statistics.median(deferred) if deferred else float("nan")}
    finally:
        del service._explanation, service._record  # the class's methods again


def fused_seconds(folder: Path, batch: int, runs: int) -> float:
    """Seconds of a forward pass spent computing the fused output (the channel mean, :mod:`handlers.fused`).

    ONNX Runtime: its profiler's kernel times of the added convolution and of the layout change of its output
    (ONNX Runtime runs it in its blocked layout and reorders the one-channel result back), an upper bound (the
    profiler adds its own cost to every node; alternating one session's runs with and without fetching the fused
    outputs swung from -6 % to +6 % here; two sessions of the graph, with and without the node, differ by several
    percent from memory placement alone). TorchScript: the mean, timed where the backend calls it. Medians over
    ``runs`` passes of one random batch of ``batch``.
    """
    import handlers.backends as backends_module
    from handlers.fused import MEAN_PREFIX, channel_mean

    manifest = Manifest.load(folder)
    tensor = torch.randn(batch, 3, *manifest.input_size, generator=torch.Generator().manual_seed(batch))
    activations = [spec.output for spec in manifest.layers]
    if manifest.backend == "torchscript":
        spent: list[float] = []

        def timed(values: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return channel_mean(values)
            finally:
                spent.append(time.perf_counter() - start)

        backend = load_backend(manifest, folder, fuse_maps=True)
        backends_module.channel_mean = timed  # type: ignore[assignment]
        try:
            for _ in range(runs):
                backend.run(tensor)
        finally:
            backends_module.channel_mean = channel_mean
        return statistics.median(spent)
    import onnx
    import onnxruntime as ort

    from handlers.fused import fuse_onnx

    model = onnx.load(str(Path(folder) / manifest.model_file))
    fused = fuse_onnx(model, {spec.output: spec.shape[0] for spec in manifest.layers})
    fetches = [manifest.main_output, *activations, *fused.values()]
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options()  # as served, plus the profiler
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(fetches, {"input": tensor.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    spans = [(e["ts"], e["dur"]) for e in events if e.get("name") == "model_run"]  # µs, one per run
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    added = [e for e in nodes if e["name"].startswith(MEAN_PREFIX) or _reorders_a_mean(e)]
    return statistics.median(
        sum(e["dur"] for e in added if begin <= e["ts"] <= begin + length) * 1e-6 for begin, length in spans
    )


def _reorders_a_mean(event: dict) -> bool:
    """Whether a profiled node is ONNX Runtime's layout change of a fused mean (a one-channel ``ReorderOutput``)."""
    shapes = event.get("args", {}).get("output_type_shape") or [{}]
    shape = next(iter(shapes[0].values()), [])
    return event.get("args", {}).get("op_name") == "ReorderOutput" and len(shape) == 4 and shape[1] == 1


def lafam_only(service: LafamService, batch: int, repeats: int = 200) -> float:
    """Median seconds of the LaFAM reduction alone on real activations of ``batch`` images."""
    from handlers.explain.lafam import lafam

    tensor = torch.randn(batch, 3, *service.manifest.input_size)
    activations = service.backend.run(tensor)[service.manifest.layers[0].output]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        lafam(activations)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Export ResNet-50 (random init) to both backends and print the overhead table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--pairs", type=int, default=20, help="ABAB pairs per configuration")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--write", type=Path, help="update this markdown file's LaFAM-overhead section")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        metrics.configure(Path(tmp) / "metrics", "off")  # recorded into multiprocess files, as in a worker
        folders = export_model(
            args.model, Path(tmp) / args.model, backends=("onnx", "torchscript"), num_classes=1000, log=lambda _: None
        )
        for backend, folder in folders.items():
            service = LafamService.from_folder(folder)
            for batch in (int(b) for b in args.batches.split(",")):
                result = measure(service, batch, args.pairs)
                in_graph = fused_seconds(folder, batch, args.pairs) / result["with"]
                reduce_ms = lafam_only(service, batch) * 1e3
                total = result["direct"] + in_graph
                rows.append(
                    f"| {backend} | {batch} | {result['without'] * 1e3:.1f} | {result['with'] * 1e3:.1f} | "
                    f"{result['direct'] * 100:.2f} % | {in_graph * 100:.2f} % | **{total * 100:.2f} %** | "
                    f"{(result['ratio'] - 1) * 100:+.2f} % | {reduce_ms:.3f} | {result['deferred'] * 1e6:.0f} |"
                )
                print(rows[-1], flush=True)
    cpu = cpu_name()
    header = (
        f"## LaFAM overhead ({args.model}, random init, 224x224, JPEG 320x240 requests)\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"no GPU. Median of {args.pairs} alternating pairs. The runtime computes the layer's channel mean in the "
        "same pass (handlers.fused), for every request; the C writer (handlers/_png.c) scales it, upsamples it and "
        f"writes the PNG in one call per image ({'built' if encode_module._native else 'NOT built: Python writer'}). "
        "'direct': the share of each call spent in the "
        "explanation step (taking the means, the scaling, nearest upsampling to 224x224 and PNG encoding), median "
        "over the calls "
        "with the map; 'after the answer': the explanation's metrics and drift statistics (on by default), "
        "recorded into multiprocess files as in a worker on the worker's metrics thread once the request has its "
        "answer (handlers.metrics.later), median per map, not in the handler's latency; 'in graph': the cost of "
        "computing the fused channel mean inside the forward pass, as a share of the handler's latency with the "
        "map (ONNX Runtime: its profiler's times of the added convolution and of its output's layout change, an "
        "upper bound; TorchScript: the mean timed in the run); "
        "'total': direct + in graph, the overhead; 'paired': median per-pair ratio − 1 of whole calls with and "
        "without the map (noisy at this resolution); 'reduction' is the reference LaFAM reduction alone "
        "(handlers.explain.lafam).\n\n"
        "| backend | batch | handler ms, no map | handler ms, with map | direct | in graph | total | paired | "
        "reduction ms | after the answer, µs per map |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = section(header + "\n".join(rows), RESULTS_MARKER)
    print(table)
    if args.write:
        write_section(args.write, table, RESULTS_MARKER)


if __name__ == "__main__":
    main()
