"""The serving spec for the model directory, allowing for custom code that loads its own model."""

from __future__ import annotations

from pathlib import Path

from container.model_dir import ModelDirError, ServingSpec, load_spec
from serve.custom import CustomHandlers


def serving_spec(model_dir: Path, custom: CustomHandlers | None) -> ServingSpec:
    """load_spec, except that a custom model_fn may load anything: its directory needs no weights."""
    try:
        return load_spec(model_dir)
    except ModelDirError:
        if custom is not None and "model_fn" in custom:
            return ServingSpec(base_model=str(model_dir), max_input_tokens=0, max_total_tokens=0)
        raise
