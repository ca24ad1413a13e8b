"""What the locustfiles here share: the run's settings, the request images, a closed-loop user, the records.

Locust loads a locustfile by path with the file's folder on ``sys.path``, so the locustfiles import this
module by its bare name. The runner (:func:`benchmarks.serving.locust_command`) passes the settings as
environment variables:

- ``LAFAM_LOAD_IMAGES``: folder of ``*.jpg`` request bodies, sent in turn;
- ``LAFAM_LOAD_MODEL``: the model to drive;
- ``LAFAM_LOAD_TOKEN``: TorchServe's inference token;
- ``LAFAM_LOAD_RECORDS``: the file that receives :data:`RECORDS` (JSON) when locust quits.
"""

import itertools
import json
import os
import pathlib
from typing import Any

from locust import FastHttpUser, constant, events

IMAGES = [p.read_bytes() for p in sorted(pathlib.Path(os.environ["LAFAM_LOAD_IMAGES"]).glob("*.jpg"))]
MODEL = os.environ["LAFAM_LOAD_MODEL"]
TOKEN = {"Authorization": "Bearer " + os.environ["LAFAM_LOAD_TOKEN"]}
RECORDS: list[list[Any]] = []
"""One row per request, appended by the locustfile; written out when locust quits."""
_NEXT = itertools.cycle(range(len(IMAGES)))


def next_image() -> bytes:
    """The next request image, in turn across all users."""
    return IMAGES[next(_NEXT)]


@events.quitting.add_listener
def _dump(**_: Any) -> None:
    pathlib.Path(os.environ["LAFAM_LOAD_RECORDS"]).write_text(json.dumps(RECORDS))


class ClosedLoopUser(FastHttpUser):
    """A user that sends its next request as soon as the last is answered."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 120.0
    connection_timeout = 10.0
