"""Deployment: a trained run to a checked ONNX or TorchScript file, its int8 variant, a report.

`formats` writes, quantises and runs the files (thin over torch.onnx, onnxruntime,
torch.jit, torch.ao), `contract` is the input description written beside them, `measure`
holds the check images and the numbers, and `pipeline.export_run` puts them in order.
"""

from vittune.deploy.pipeline import ExportResult, Variant, export_run, format_table

__all__ = ["ExportResult", "Variant", "export_run", "format_table"]
