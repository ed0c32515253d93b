"""Export to ONNX: ``export_onnx(model, "model.onnx")``, or from the shell
``python -m ddetr.export --model SRC --output model.onnx``."""

from ddetr.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportError, OnnxExport, export_onnx

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPSETS", "ExportError", "OnnxExport", "export_onnx"]
