"""The ``lafam-serve`` command: export, archive, eval, explain, serve, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import offline
from cli import serve as serve_cli
from export.exporter import IMAGENET_MEAN, IMAGENET_STD

EXPORT_ARGUMENTS = (
    "layers", "weights", "num_classes", "labels", "input_size", "mean", "std", "task", "name", "tolerance", "eager",
    "dynamic_size", "quantize", "int8_min_agreement", "int8_min_spearman",
)  # fmt: skip
"""The ``export`` subcommand's arguments handed as they are to :func:`export.exporter.export_model`."""
CALIBRATION_SCENES = 128
"""Generated demo scenes an INT8 export calibrates on without ``--calibration``: 96 calibrate, 32 are held out."""
CALIBRATION_SEED = 90_000
"""Their seed: none of the seeds the demo models were trained or evaluated on (demo.train, evaluation.data)."""


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sides, got {text!r}")
    return values[0], values[1]


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lafam-serve", description="Serve image models with a LaFAM explanation on every prediction."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export",
        help="export a model with activation outputs, verified against eager",
        description="Export MODEL (a torchvision name like resnet50, or package.module:factory) to ONNX and/or "
        "TorchScript with the chosen layers' activations as extra outputs; verify every output against eager.",
    )
    export.add_argument("model", help="torchvision model name, or package.module:factory returning an nn.Module")
    export.add_argument("--weights", type=Path, help="state_dict file (no weights are downloaded)")
    export.add_argument("--num-classes", type=int, help="number of classes (torchvision models)")
    export.add_argument("--labels", type=Path, help="class names, one per line")
    export.add_argument("--task", choices=("classification", "embedding"), default="classification")
    export.add_argument(
        "--layer",
        action="append",
        dest="layers",
        help=(
            "layer to export (repeatable): a CNN stage, a Swin stage (N, H, W, C) or a ViT block (tokens on the "
            "patch grid); default: the last convolutional stage or transformer block, found automatically"
        ),
    )
    export.add_argument("--input-size", type=_size, default=(224, 224), help="N or HxW (default 224)")
    export.add_argument("--mean", type=_triple, default=IMAGENET_MEAN, help="r,g,b (default ImageNet)")
    export.add_argument("--std", type=_triple, default=IMAGENET_STD, help="r,g,b (default ImageNet)")
    export.add_argument("--backend", choices=("onnx", "torchscript", "both"), default="onnx")
    export.add_argument("--name", help="model name (default: from MODEL)")
    export.add_argument("--out", type=Path, default=Path("out/export"), help="output folder (default out/export)")
    export.add_argument(
        "--tolerance", type=float, help="relative: max|eager - exported| <= T * max|eager| per output (default 1e-4)"
    )
    export.add_argument(
        "--eager",
        action="store_true",
        help="also ship the eager model (state_dict + architecture) for backward-pass explanations on /explanations",
    )
    export.add_argument(
        "--dynamic-size",
        action="store_true",
        help="the graph takes any input height and width (fully convolutional models with global pooling), so "
        "requests may ask for resize=none or a maximum side; checked on the eager model and verified at a second, "
        "non-square size; refused, naming what fails, for a model that cannot take it",
    )
    export.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: ONNX Runtime static quantisation of the ONNX graph (QDQ, per-channel int8 weights, uint8 "
        "activations), checked against the float graph on held-out images (top-1 agreement, LaFAM map rank "
        "correlation); ONNX only (with --backend both the TorchScript graph stays float32)",
    )
    export.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="with --quantize int8: a folder of .jpg/.png images like the served ones, preprocessed as the server "
        f"does; every 4th is held out for the check (default: {CALIBRATION_SCENES} generated demo scenes)",
    )
    export.add_argument(
        "--int8-min-agreement",
        type=float,
        metavar="F",
        help="with --quantize int8: least top-1 agreement with the float graph on held-out images (an embedding: "
        "median cosine similarity); default 0.99",
    )
    export.add_argument(
        "--int8-min-spearman",
        type=float,
        metavar="F",
        help="with --quantize int8: least median Spearman correlation of the INT8 and float LaFAM maps; default 0.95",
    )
    export.add_argument("--archive", action="store_true", help="also build the .mar (first backend)")
    export.add_argument("--model-store", type=Path, default=Path("model_store"))

    archive = commands.add_parser(
        "archive",
        help="pack an export folder into a self-contained .mar",
        description="Pack an export folder (graph + lafam.json) with the serving code into <model-store>/<name>.mar.",
    )
    archive.add_argument("export_dir", type=Path, help="a backend folder written by 'export' (e.g. out/export/x/onnx)")
    archive.add_argument("--name", help="model name in TorchServe (default: the manifest's)")
    archive.add_argument("--model-store", type=Path, default=Path("model_store"))
    archive.add_argument("--batch-size", type=int, default=8)
    archive.add_argument("--max-batch-delay", type=int, default=10, help="milliseconds")
    archive.add_argument("--workers", type=int, default=1)
    archive.add_argument("--version", default="1.0")
    archive.add_argument(
        "--no-eager", action="store_true", help="leave the export's eager model out (/explanations: LaFAM only)"
    )

    evaluate = commands.add_parser(
        "eval",
        help="score the served explanations against object masks (+ grid pointing game, sanity check)",
        description="Request every explanation method for images with exact object masks, from a local archive "
        "or a running server, and write results.md, results.json and montage.png.",
    )
    where = evaluate.add_mutually_exclusive_group(required=True)
    where.add_argument("--archive", type=Path, help="a .mar or export folder, served in process")
    where.add_argument("--url", help="a running TorchServe's inference API, e.g. http://127.0.0.1:8080")
    evaluate.add_argument("--model", help="model name on the server (with --url)")
    evaluate.add_argument("--token-file", type=Path, help="TorchServe's key_file.json (with --url)")
    evaluate.add_argument("--data", default="synthetic", help="'synthetic' (demo scenes) or a folder of images + masks")
    evaluate.add_argument("--samples", type=int, default=50, help="synthetic images (default 50)")
    evaluate.add_argument("--grids", type=int, default=20, help="2x2 grids for the grid pointing game (0: skip)")
    evaluate.add_argument("--sanity", type=int, default=8, help="images for the sanity check (0: skip; --archive only)")
    evaluate.add_argument("--out", type=Path, default=Path("results/eval"), help="output folder (default results/eval)")

    explain = commands.add_parser(
        "explain",
        help="explain image files offline: the JSON /explanations would answer, without a server",
        description="Serve ARCHIVE_OR_EXPORT_DIR in process with the server's own code and explain each IMAGE as "
        "POST /explanations/{model} would (backward-pass methods allowed; default method as the server's). "
        "Prints the server's JSON: one object per image, a list when there are several; a failed image is "
        'its error object {"error": {"code": ..., "message": ...}}.',
        epilog=offline.EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    offline.add_arguments(explain)

    serve = commands.add_parser(
        "serve",
        help="serve archives with TorchServe, KServe's model server or Ray Serve until stopped",
        description="Serve ARCHIVEs (.mar files or export folders) on one engine: the same routes "
        "(/predictions, /explanations, KServe v1 :predict/:explain, v2 /infer on kserve and ray), answers, "
        "errors and lafam_* metrics on each.",
        epilog=serve_cli.EXIT_CODES,
    )
    serve_cli.add_arguments(serve)

    demo = commands.add_parser("demo", help="build the demo model, serve it, query it, write overlays, stop")
    demo.add_argument("--out", type=Path, default=Path("out"))
    demo.add_argument("--model-store", type=Path, default=Path("model_store"))
    demo.add_argument("--samples", type=int, default=6)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            from export.archive import build_archive
            from export.exporter import export_model

            backends = ("onnx", "torchscript") if args.backend == "both" else (args.backend,)
            calibration: dict[str, object] = {}
            if args.calibration is not None:
                calibration["calibration"] = args.calibration
            elif args.quantize == "int8":
                calibration["calibration"] = calibration_scenes(args.input_size)
                calibration["calibration_source"] = (
                    f"{CALIBRATION_SCENES} generated demo scenes (scenes.synthetic, seed {CALIBRATION_SEED})"
                )
            folders = export_model(
                args.model,
                args.out / (args.name or args.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]),
                backends=backends,
                log=print,
                **calibration,  # type: ignore[arg-type]
                **{argument: getattr(args, argument) for argument in EXPORT_ARGUMENTS},
            )
            for backend, folder in folders.items():
                print(f"{backend}: {folder}")
            if args.archive:
                build_archive(folders[backends[0]], args.model_store, name=args.name, log=print)
        elif args.command == "archive":
            from export.archive import build_archive, model_config

            config = model_config(
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay,
                min_workers=args.workers,
                max_workers=args.workers,
            )
            build_archive(
                args.export_dir,
                args.model_store,
                name=args.name,
                version=args.version,
                config=config,
                eager=not args.no_eager,
                log=print,
            )
        elif args.command == "eval":
            return _evaluate(args)
        elif args.command == "explain":
            return offline.run(args)
        elif args.command == "serve":
            return serve_cli.run(args)
        elif args.command == "demo":
            from demo.run import run_demo

            run_demo(args.out, args.model_store, args.samples)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"lafam-serve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def calibration_scenes(
    input_size: tuple[int, int], count: int = CALIBRATION_SCENES, seed: int = CALIBRATION_SEED
) -> list[bytes]:
    """Generated demo scenes as PNG files, the default calibration images of an INT8 export.

    Square scenes with the input's longer side (at least :data:`scenes.synthetic.MIN_SIZE`); the export resizes
    them to the input size as the server resizes a request.
    """
    import io

    from PIL import Image

    from scenes.synthetic import MIN_SIZE, generate_dataset

    encoded = []
    for scene in generate_dataset(count, seed, size=max(MIN_SIZE, *input_size)):
        buffer = io.BytesIO()
        Image.fromarray(scene.image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _evaluate(args: argparse.Namespace) -> int:
    from evaluation import report
    from evaluation.data import folder_samples, synthetic_grids, synthetic_samples
    from evaluation.runner import evaluate, grid_game
    from evaluation.sanity import sanity_check
    from evaluation.sources import LocalSource, RestSource, read_token

    if args.url:
        if not args.model:
            raise ValueError("--url needs --model (the model's name on the server)")
        source = RestSource(args.url, args.model, read_token(args.token_file) if args.token_file else None)
        where = f"{args.url}/explanations/{args.model}"
    else:
        source = LocalSource(args.archive)
        where = str(args.archive)
    samples = synthetic_samples(args.samples) if args.data == "synthetic" else folder_samples(args.data)
    results = evaluate(source, samples)
    grid = grid_game(source, synthetic_grids(args.grids)) if args.grids and args.data == "synthetic" else None
    sanity = None
    if args.sanity and isinstance(source, LocalSource) and source.service.engines is not None:
        sanity = sanity_check(source, samples[: args.sanity])
    paths = report.write(
        args.out,
        header=report.header(source.name, where, len(samples)),
        samples=samples,
        results=results,
        grid=grid,
        sanity=sanity,
    )
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
