"""LoRA adapters registered while the server runs: SageMaker's adapter inference components.

When an adapter component is created on an endpoint, SageMaker unpacks its model.tar.gz on the instance
and calls the base component's container: `POST /adapters` with `name` and `src` (a local folder), as a
JSON body or as query parameters; deleting the component calls `DELETE /adapters/{name}`. Invocations of
the adapter component then carry `X-Amzn-SageMaker-Adapter-Identifier: {name}`. (The interface is the one
AWS's model-hosting-container-standards library and DJL-Serving implement; SageMaker's guide does not
document the container side.)

Each gunicorn worker runs its own engine, and a registration reaches only one of them, so the registry
lives in a folder all workers share: one JSON file per adapter, written whole by rename. A worker looks an
adapter up there when a request names it, and vLLM loads it on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from container.model_dir import ADAPTER_DIR
from serve.errors import BadRequest, NotFound, ValidationError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (fullmatch)
FIRST_REGISTERED_ID = 1 << 20  # vLLM's adapter ids: LORA_ADAPTERS take 1..N, registered ones are above


def adapter_folder(src: str) -> Path:
    """The peft adapter in `src`: the folder itself, or the adapter/ of a model directory `train` wrote
    (so a twin's own model.tar.gz can be an adapter component as it is)."""
    folder = Path(src)
    if not folder.is_absolute():
        raise ValidationError(f"adapter src must be a local absolute path (SageMaker unpacks the component's "
                              f"model.tar.gz and passes its folder), got {src!r}")
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise ValidationError(f"adapter {src}: {candidate}/adapter_model.safetensors is missing "
                                      "(adapters load from safetensors only, never pickles)")
            return candidate
    raise ValidationError(f"adapter {src} holds no adapter_config.json (neither at its top nor in {ADAPTER_DIR}/)")


def adapter_rank(folder: Path) -> int:
    try:
        with open(folder / "adapter_config.json", encoding="utf-8") as f:
            return int(json.load(f).get("r", 16))
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, or a rank that is no number
        raise ValidationError(f"adapter {folder}: adapter_config.json is not a peft adapter config ({e})") from None


class AdapterRegistry:
    """The adapters registered on this server, by name: {name: (folder, vLLM adapter id)}."""

    def __init__(self, folder: Path):
        self.folder = folder

    def check(self, name: str, src: str, max_rank: int) -> tuple[Path, int]:
        """The adapter folder `src` holds, checked, and a new vLLM id for it; nothing is recorded yet."""
        if not NAME.fullmatch(name or ""):
            raise BadRequest(f"adapter name {name!r} is not valid: 1-128 letters, digits, '.', '_' or '-'")
        adapter = adapter_folder(src)
        rank = adapter_rank(adapter)
        if rank > max_rank:
            raise ValidationError(f"adapter {name!r} has LoRA rank {rank}, above this endpoint's MAX_LORA_RANK="
                                  f"{max_rank}: redeploy the base with MAX_LORA_RANK={rank} or more")
        # A new id on every registration: vLLM caches adapters by id, so one re-registered from another
        # folder must not be answered from the old weights.
        digest = hashlib.sha256(f"{name}\0{adapter}\0{time.time_ns()}".encode()).digest()
        return adapter, FIRST_REGISTERED_ID + int.from_bytes(digest[:4], "big") % (2**31 - FIRST_REGISTERED_ID)

    def record(self, name: str, folder: Path, number: int) -> None:
        """Make the adapter known to every worker, written whole (a temporary file renamed into place)."""
        staging = self.folder / f".{name}.{os.getpid()}.tmp"
        staging.write_text(json.dumps({"name": name, "src": str(folder), "id": number}), encoding="utf-8")
        staging.replace(self.folder / f"{name}.json")

    def unregister(self, name: str) -> int:
        """Forget `name`; its vLLM id, so the engine can drop it. NotFound when it was never registered."""
        entry = self.lookup(name)
        if entry is None:
            raise NotFound(f"adapter {name!r} is not registered")
        (self.folder / f"{name}.json").unlink(missing_ok=True)
        return entry[1]

    def lookup(self, name: str) -> tuple[Path, int] | None:
        if not NAME.fullmatch(name or ""):
            return None
        try:
            entry = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return Path(entry["src"]), int(entry["id"])

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json"))
