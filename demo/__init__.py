"""The project's own demo: synthetic shape scenes, a small CNN trained on them, and its training script."""
