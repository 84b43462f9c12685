"""Custom inference code: `code/inference.py` in the model directory, the SageMaker Hugging Face
toolkit's convention. Any of these, each with or without a trailing `context` argument, replaces the
built-in step of the same name:

    model_fn(model_dir)                    -> model       default: the built-in engine's model
    input_fn(body, content_type)           -> data        default: JSON (a TGI or chat request)
    predict_fn(data, model)                -> prediction  default: generate through the vLLM engine
    output_fn(prediction, accept)          -> body        default: JSON

With a predict_fn no vLLM engine starts: serve/predict.py runs it, one call at a time. Without a
model_fn, `model` is {"model": <transformers model>, "tokenizer": <tokenizer>}. A custom model_fn needs a
predict_fn: the built-in one only knows the built-in model. The module is imported once, by `serve`
before gunicorn forks its workers (serve/startup.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

HANDLERS = ("model_fn", "input_fn", "predict_fn", "output_fn")
POSITIONAL = {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}


class CustomCodeError(Exception):
    """code/inference.py is unusable; the message says why."""


@dataclass(frozen=True)
class Context:
    """What the toolkit's `context` offers handlers that ask for it."""

    model_dir: str
    system_properties: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CustomHandlers:
    path: Path
    functions: dict[str, Callable]  # only the handlers the module defines, already bound to context

    def __contains__(self, name: str) -> bool:
        return name in self.functions

    def __getitem__(self, name: str) -> Callable:
        return self.functions[name]


def load_custom_handlers(model_dir: Path) -> CustomHandlers | None:
    path = model_dir / "code" / "inference.py"
    if not path.is_file():
        return None
    if (path.parent / "requirements.txt").is_file():  # the toolkits pip-install it at start; nothing is, here
        log.warning("%s/requirements.txt is not installed: the image installs nothing at start, so inference.py "
                    "runs on the image's versions; build an image FROM this one with them", path.parent)
    # Imported here, in gunicorn's master before the workers fork: torch.cuda.is_available() at import time must
    # ask NVML, not initialise CUDA, or no forked worker could use the GPU (the image sets it too).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    sys.path.insert(0, str(path.parent))  # the toolkit puts code/ on sys.path for the module's own imports
    spec = importlib.util.spec_from_file_location("inference", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise CustomCodeError(f"{path} failed to import: {type(e).__name__}: {e}") from e
    context = Context(str(model_dir), {"model_dir": str(model_dir)})
    functions = {name: _bind(name, getattr(module, name), context) for name in HANDLERS if hasattr(module, name)}
    if not functions:
        raise CustomCodeError(f"{path} defines none of {', '.join(HANDLERS)}")
    if "model_fn" in functions and "predict_fn" not in functions:
        raise CustomCodeError(f"{path} defines model_fn without predict_fn: "
                              "the built-in predict_fn only serves the built-in model")
    return CustomHandlers(path, functions)


def _bind(name: str, function, context: Context) -> Callable:
    """Accept both signatures: f(args...) and f(args..., context)."""
    if not callable(function):
        raise CustomCodeError(f"inference.py: {name} is not a function")
    count = len([p for p in inspect.signature(function).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    expected = POSITIONAL[name]
    if count == expected:
        return function
    if count == expected + 1:
        return lambda *args: function(*args, context)
    raise CustomCodeError(f"inference.py: {name} takes {count} arguments; "
                          f"expected {expected}, or {expected + 1} with context")
