"""Canary gateway: a gRPC gateway for ONNX models with canary routing and governance."""
