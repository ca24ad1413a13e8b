"""The serving benchmark's locustfile (``benchmarks.serving``): POST the benchmark JPEGs to one model.

Every request is recorded as ``[end unix time, ms, failed]``. Settings besides :mod:`lafam_locust`'s:
``LAFAM_LOAD_EXPECT``, text every 200 response must hold (empty: any 200 passes).
"""

import os
import time
from typing import Any

from lafam_locust import MODEL, RECORDS, TOKEN, ClosedLoopUser, next_image
from locust import events, task

_PATH = "/predictions/" + MODEL
_EXPECT = os.environ.get("LAFAM_LOAD_EXPECT", "")
_HEADERS = {**TOKEN, "Content-Type": "image/jpeg"}


@events.request.add_listener
def _record(response_time: float, exception: BaseException | None, **_: Any) -> None:
    RECORDS.append([time.time(), response_time, exception is not None])


class Client(ClosedLoopUser):
    """Predictions only, one image after another."""

    @task
    def predict(self) -> None:
        """POST the next image; a failure unless 200 (with the expected text)."""
        with self.client.post(_PATH, data=next_image(), headers=_HEADERS, catch_response=True) as reply:
            if reply.status_code != 200:
                reply.failure(f"HTTP {reply.status_code}: {(reply.text or '')[:200]}")
            elif _EXPECT and _EXPECT not in (reply.text or ""):
                reply.failure(f"no {_EXPECT!r} in the response")
