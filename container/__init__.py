"""The SageMaker contract shared by `train` and `serve`: /opt/ml paths, config files, the failure file,
the model directory format and the image's entrypoint. Nothing here imports torch."""
