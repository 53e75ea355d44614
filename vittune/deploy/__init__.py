"""Deployment: a trained run as files other tools load.

`timm_folder` writes the run folder's `model.safetensors` + timm `config.json` + model card.
For `vittune export`: `formats` writes, quantises and runs ONNX / TorchScript files (thin over
torch.onnx, onnxruntime, torch.jit, torch.ao), `contract` is the input description written
beside them, `measure` holds the check images and the numbers, and `pipeline.export_run` puts
them in order.
"""
