"""BlindSight for ONNX Runtime."""
