"""Inference: a TGI-compatible SageMaker endpoint over the model directory `train` writes."""
