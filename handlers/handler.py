"""The TorchServe handler: lifecycle only, everything else is delegated to :mod:`handlers.service`.

This is the only module that knows TorchServe's calling convention (``initialize(context)`` and
``handle(data, context)`` with per-request headers and statuses on the context). Archives ship it as
their ``--handler``; TorchServe instantiates the single class defined here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from . import metrics
from .service import LafamService, Request

logger = logging.getLogger(__name__)


def select_device(gpu_id: int | None) -> torch.device:
    """Return ``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA is usable, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class LafamHandler:
    """TorchServe entry point serving predictions with a LaFAM explanation."""

    def __init__(self) -> None:
        self.service: LafamService | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the manifest and graph from the archive onto the assigned device; start the exporter."""
        properties = context.system_properties
        device = select_device(properties.get("gpu_id"))
        config = (getattr(context, "model_yaml_config", None) or {}).get("lafam") or {}
        self.service = LafamService.from_folder(properties["model_dir"], device, config)
        metrics.start_exporter()
        self.initialized = True
        logger.info(
            "serving %s (%s) on %s; /explanations methods: %s",
            self.service.manifest.name,
            self.service.backend.name,
            device,
            ", ".join(self.service.explain_methods),
        )

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
        """Answer a batch; each request gets its own status and a compact JSON body."""
        if data is None:
            return None
        if self.service is None:
            self.initialize(context)
        requests = [self._request(index, item, context) for index, item in enumerate(data)]
        replies = self.service.predict(requests)
        for index, reply in enumerate(replies):
            context.set_response_status(reply.status, reply.phrase, index)
            context.set_response_content_type(index, "application/json")
        return [json.dumps(reply.body, separators=(",", ":")) for reply in replies]

    @staticmethod
    def _request(index: int, item: dict[str, Any], context: Any) -> Request:
        headers: dict[str, str] = {}
        content_types: dict[str, str] = {}
        for key, value in (context.get_all_request_header(index) or {}).items():
            if isinstance(value, dict):  # TorchServe puts each parameter's content type here
                content_types[key] = str(value.get("content-type") or "")
            else:
                headers[str(key).lower()] = str(value)
        # TorchServe marks requests to POST /explanations/{model} with this header (value "True")
        explain = headers.get("explain", "").strip().lower() == "true"
        return Request(parameters=item or {}, headers=headers, content_types=content_types, explain=explain)
