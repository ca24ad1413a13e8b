"""Evaluation of explanation maps: localisation and sanity-check metrics, the grid builder and the eval runner.

:mod:`evaluation.metrics` is plain numpy; the runner (``lafam-serve eval``) adds the model and data around it.
"""
