"""Deploy: a trained model on photographs it has never seen. Caffe and ONNX Runtime inference, the
model's sidecar (mean, FOV diameter, thresholds), the ONNX export, and screening of any camera's
photographs. May import redseg.toolchain, redseg.data, redseg.evaluation and the top-level modules.
"""
