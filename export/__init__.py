"""ONNX export: one self-contained, checked and verified file per model."""

from export.onnx_export import ExportResult, export_onnx, load_onnx_checked, verify_onnx

__all__ = ["ExportResult", "export_onnx", "load_onnx_checked", "verify_onnx"]
