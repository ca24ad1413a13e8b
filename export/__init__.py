"""Build time: resolve a model, export it to verified ONNX / TorchScript graphs with their manifests, archive them.

``export`` may import ``handlers`` (the manifest schema, the backends used for verification); ``handlers``
never imports ``export``.
"""

from export.exporter import IMAGENET_MEAN, IMAGENET_STD, ExportError, export_model
from export.models import ActivationModel, ModelSpecError, find_default_layer, resolve_model
from export.onnx import OnnxExportError, export_onnx
from export.pipeline import export_and_archive
from export.quantize import QuantizationError
from export.torchscript import TorchScriptExportError, export_torchscript
from export.verify import DEFAULT_TOLERANCE, VerificationError, VerificationReport, verify_report

__all__ = [
    "DEFAULT_TOLERANCE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ActivationModel",
    "ExportError",
    "ModelSpecError",
    "OnnxExportError",
    "QuantizationError",
    "TorchScriptExportError",
    "VerificationError",
    "VerificationReport",
    "export_and_archive",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "find_default_layer",
    "resolve_model",
    "verify_report",
]
