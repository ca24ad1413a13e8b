"""The project's own demo: a small CNN (and ViT) trained on :mod:`scenes`, their training scripts and weights."""
