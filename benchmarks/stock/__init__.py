"""Files of the stock-TorchServe archives in ``benchmarks.serving``: model definitions and one handler tweak."""
