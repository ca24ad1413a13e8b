"""The serving engines beside TorchServe: the same archives behind KServe's model server or Ray Serve.

TorchServe (archived upstream, 0.12.0 its last release) stays the default engine. The engines here load the
same ``.mar`` (or export folder) into the same :class:`handlers.service.LafamService` and speak the same
HTTP contract (:mod:`engines.protocol`): TorchServe's ``/predictions`` and ``/explanations`` routes, KServe
v1 (``:predict``, ``:explain``) and v2 (``/infer``), one shared bearer token (:mod:`engines.auth`), the same
error JSON, status codes and Prometheus metrics. Imports ``handlers`` only; the engines' heavy packages
(``kserve``, ``ray[serve]``) are optional extras imported by their own modules.
"""
