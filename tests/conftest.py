"""Suite-wide set-up: metrics go to a private folder and no exporter binds a port unless a test asks."""

from __future__ import annotations

import os
import tempfile

# Must run before handlers.metrics is imported (prometheus-client picks its storage at import).
os.environ.setdefault("LAFAM_METRICS_DIR", tempfile.mkdtemp(prefix="lafam-test-metrics-"))
os.environ.setdefault("LAFAM_METRICS_ADDRESS", "off")
