"""Ratio benchmarks (never timed tests): each prints figures measured side by side in one run."""
