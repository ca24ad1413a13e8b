"""The soak's locustfile (``benchmarks.soak``, also the load and fault tests'): a fixed mix of good and bad requests.

Every request is recorded as ``[end unix time, ms, kind, status, unexpected]``. Settings besides
:mod:`lafam_locust`'s: ``LAFAM_LOAD_MIX``, the task weights by kind (JSON); ``LAFAM_LOAD_MAX_REQUESTS``,
quit after this many requests (0: no limit).
"""

import json
import os
import time

from lafam_locust import MODEL, RECORDS, TOKEN, ClosedLoopUser, next_image
from locust import task

_MIX = json.loads(os.environ["LAFAM_LOAD_MIX"])
_MAX = int(os.environ.get("LAFAM_LOAD_MAX_REQUESTS", "0"))


class Client(ClosedLoopUser):
    """Predictions, Grad-CAM and LRP explanations, and junk bytes, by weight."""

    def _send(self, kind: str, path: str, headers: dict[str, str], *, data: bytes, expected: int, needle: str) -> None:
        start = time.perf_counter()
        with self.client.post(path, data=data, headers=headers, name=kind, catch_response=True) as reply:
            ms = (time.perf_counter() - start) * 1e3
            text = reply.text or ""
            unexpected = reply.status_code != expected or needle not in text
            if unexpected:
                reply.failure(f"{kind}: HTTP {reply.status_code} (expected {expected}): {text[:200]}")
            else:
                reply.success()
        RECORDS.append([time.time(), ms, kind, reply.status_code, unexpected])
        if _MAX and len(RECORDS) >= _MAX:
            self.environment.runner.quit()

    @task(_MIX["predict"])
    def predict(self) -> None:
        """A prediction with its LaFAM map (200 with an explanation)."""
        headers = {**TOKEN, "Content-Type": "image/jpeg"}
        self._send("predict", "/predictions/" + MODEL, headers, data=next_image(), expected=200, needle='"explanation"')

    @task(_MIX["gradcam"])
    def gradcam(self) -> None:
        """A Grad-CAM explanation (200)."""
        headers = {**TOKEN, "Content-Type": "image/jpeg", "X-LaFAM-Method": "gradcam"}
        self._send("gradcam", "/explanations/" + MODEL, headers, data=next_image(), expected=200, needle='"gradcam"')

    @task(_MIX["lrp"])
    def lrp(self) -> None:
        """An LRP explanation (200)."""
        headers = {**TOKEN, "Content-Type": "image/jpeg", "X-LaFAM-Method": "lrp"}
        self._send("lrp", "/explanations/" + MODEL, headers, data=next_image(), expected=200, needle='"lrp"')

    @task(_MIX["junk"])
    def junk(self) -> None:
        """Junk bytes (400 invalid_image)."""
        headers = {**TOKEN, "Content-Type": "image/png"}
        self._send(
            "junk", "/predictions/" + MODEL, headers, data=b"not an image " * 8, expected=400, needle="invalid_image"
        )
