"""Measurement: every model, baseline included, predicting every validation, gate and test image once,
and the table of accuracies, macro-F1, paired comparisons with the baseline, size and latency
built from those predictions (``evaluate.py``), with the ONNX export checked against PyTorch and
timed the same way (``export.py``). It may use training (the engine's ``predict``), data (the
prepared splits), the decision's shared rules (``gate``) and the shared vocabulary; it knows
nothing of MLflow or the registry.
"""
