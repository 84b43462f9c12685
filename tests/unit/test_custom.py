"""code/inference.py, loaded as the SageMaker toolkits load it."""

import logging

from serve.custom import load_custom_handlers


def test_custom_code_imports_with_cuda_asked_through_nvml_and_an_uninstalled_requirements_file_is_said(
        tmp_path, monkeypatch, caplog):
    """It is imported in gunicorn's master, before the workers fork: a CUDA check at import must not initialise
    CUDA there. A requirements.txt beside it is not installed (nothing is at start), and the log says so."""
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "")  # restored after; unset below, as in a fresh process
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK")
    code = tmp_path / "code"
    code.mkdir()
    (code / "inference.py").write_text("import os\nSEEN = os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK')\n\n"
                                       "def predict_fn(data, model):\n    return SEEN\n")
    (code / "requirements.txt").write_text("numpy==1.26.4\n")
    with caplog.at_level(logging.WARNING, logger="serve.custom"):
        handlers = load_custom_handlers(tmp_path)
    assert handlers.functions["predict_fn"](None, None) == "1"
    assert f"{code}/requirements.txt is not installed: the image installs nothing at start" in caplog.text
