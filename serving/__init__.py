"""Run a real TorchServe (:mod:`serving.torchserve`) for the demo, the end-to-end tests and the benchmarks.

Imports nothing of the project, so every layer above it (demo, evaluation, benchmarks, tests) can use it.
"""
