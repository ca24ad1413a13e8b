"""lafam-serve's serve-time package: everything that runs inside a TorchServe worker.

Only :mod:`handlers.handler` knows about TorchServe; every other module is plain Python and torch.
"""
