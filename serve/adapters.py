"""LoRA adapters: which ones a request may name, and those registered while the server runs.

Fixed adapters come with the start: TGI's LORA_ADAPTERS, and the model directory's own adapter when it
holds only an adapter (weights="adapter"), which is what a request that names none gets.

Registered adapters are SageMaker's adapter inference components. When one is created on an endpoint,
SageMaker unpacks its model.tar.gz on the instance and calls the base component's container:
`POST /adapters` with `name` and `src` (a local folder), as a JSON body or as query parameters; deleting
the component calls `DELETE /adapters/{name}`. Invocations of the adapter component then carry
`X-Amzn-SageMaker-Adapter-Identifier: {name}`. (The interface is the one AWS's
model-hosting-container-standards library and DJL-Serving implement; SageMaker's guide does not document
the container side.)

A registered adapter is an inference component of its own, which IAM lets some callers invoke and not
others: only SageMaker's adapter header reaches it. A body naming it (adapter_id, an OpenAI `model`) on a
request without the header, which is an invocation of the base component, gets the error an unknown name
gets, so the base component's callers can neither use nor discover the twins registered beside it.

Registration is a privileged route (SageMaker's front end never forwards a caller's request to it), but a
container run locally has it on an open port: `src` is taken only under ADAPTER_SOURCE_ROOT (/opt/ml
unless set), symlinks resolved first, with one error for every path outside it, whether it exists or not;
the body must be JSON (a web page cannot send that cross-origin without the container's consent); and the
served model's own names (`llm-twin`, `model`) cannot be taken. An error about a request's adapter never
lists the others: on an endpoint hosting several people's twins, their names are theirs.

The registration body may also carry AWS's `preload` (default true: load the adapter into the engine at
registration) and `pin` (default false: never evict it from the engine's cache of MAX_LORAS adapters), as
model-hosting-container-standards' SageMakerRegisterLoRAAdapterRequest defines them; serve/lora_cache.py
honours them in each worker's engine. Registering a name again replaces the adapter in place: the new
version gets a new vLLM id, requests already running finish on the old one, and each worker unloads the
old one once nothing there uses it.

Each gunicorn worker runs its own engine, and a registration reaches only one of them, so the registry
lives in a folder all workers share: one JSON file per adapter, written whole by rename. A worker looks an
adapter up there when a request names it, and vLLM loads it on first use. Nothing here knows vLLM: an
`Adapter` is what the engine turns into vLLM's LoRARequest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Mapping

from container.model_dir import ADAPTER_DIR
from serve.errors import BadRequest, NotFound, ValidationError
from serve.schemas import MODEL_NAME, NEUTRAL_MODELS, GenerateRequest

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (fullmatch)
FIRST_REGISTERED_ID = 1 << 20  # vLLM's adapter ids: fixed adapters take 1..N, registered ones count up from here
NEXT_ID_FILE = ".next-id"  # in the registry: the next registration's id, never handed out twice
MODEL_ADAPTER = "model"  # the name of an adapter-only model directory's own adapter
RESERVED_NAMES = (*NEUTRAL_MODELS, MODEL_ADAPTER)  # the served model's names: no adapter may take them
DEFAULT_RANK = 16  # peft's LoraConfig default, for an adapter_config.json that names no rank
# What SageMaker's adapter inference component calls the adapter: AWS's library names it in its answers to
# POST and DELETE /adapters ("Adapter {alias} registered"); it never chooses an adapter for a request.
ALIAS_HEADER = "X-Amzn-SageMaker-Adapter-Alias"
REGISTRATION_FIELDS = {"name": str, "src": str, "preload": bool, "pin": bool}  # AWS's, with their defaults below
LIST_LIMIT = 100  # GET /adapters' page, AWS's SageMakerListLoRAAdaptersRequest default


@dataclass(frozen=True)
class Adapter:
    name: str
    number: int  # vLLM's adapter id: a new one for every registration, so vLLM never answers from stale weights
    path: Path
    pin: bool = False  # never evicted from the engine's cache (registered with "pin": true)
    preload: bool = False  # loaded into the engine at registration rather than at its first request
    alias: str | None = None  # X-Amzn-SageMaker-Adapter-Alias at registration: what the answers call it


def parse_registration(body: dict) -> dict:
    """POST /adapters' JSON body as AWS's SageMakerRegisterLoRAAdapterRequest defines it: `name` and `src`
    (non-empty strings), `preload` (default true) and `pin` (default false), booleans. Other fields are
    ignored, as AWS's model ignores them."""
    missing = [key for key in ("name", "src") if not isinstance(body.get(key), str) or not body[key]]
    if missing:
        raise BadRequest(f"registering an adapter needs {' and '.join(missing)} (strings): "
                         '{"name": "alice", "src": "/path/to/adapter"}')
    for key in ("preload", "pin"):
        if key in body and not isinstance(body[key], bool):
            raise BadRequest(f"'{key}' must be true or false, got {json.dumps(body[key])[:40]}")
    ignored = sorted(set(body) - set(REGISTRATION_FIELDS))
    if ignored:
        log.warning("POST /adapters: ignored the fields %s", ", ".join(repr(key[:40]) for key in ignored[:8]))
    return {"name": body["name"], "src": body["src"], "preload": body.get("preload", True),
            "pin": body.get("pin", False)}


def adapter_folder(src: str, root: Path) -> Path:
    """The peft adapter in `src`: the folder itself, or the adapter/ of a model directory `train` wrote
    (so a twin's own model.tar.gz can be an adapter component as it is). `src` must resolve, symlinks
    followed, to a folder under `root`; the refusal says the same whether or not the path exists. What is
    loaded from it must be inside it too: a symlink in the component's archive could otherwise point at
    another component's weights."""
    if not Path(src).is_absolute():
        raise ValidationError(f"adapter src must be a local absolute path (SageMaker unpacks the component's "
                              f"model.tar.gz and passes its folder), got {src!r}")
    folder = Path(os.path.realpath(src))
    root = Path(os.path.realpath(root))
    if folder != root and root not in folder.parents:
        raise ValidationError(f"adapter src must be a folder under {root} (ADAPTER_SOURCE_ROOT), got {src!r}")
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise ValidationError(f"adapter {src}: {candidate}/adapter_model.safetensors is missing "
                                      "(adapters load from safetensors only, never pickles)")
            for path in (candidate, candidate / "adapter_config.json", candidate / "adapter_model.safetensors"):
                if os.path.realpath(path) != str(path):
                    raise ValidationError(f"adapter {src}: {path.relative_to(folder) if path != folder else '.'} "
                                          "is a symlink: an adapter's files must be in its own folder")
            return candidate
    raise ValidationError(f"adapter {src} holds no adapter_config.json (neither at its top nor in {ADAPTER_DIR}/)")


def adapter_rank(folder: Path | str) -> int:
    """The LoRA rank in a peft adapter's adapter_config.json: the one place it is read."""
    try:
        with open(Path(folder) / "adapter_config.json", encoding="utf-8") as f:
            return int(json.load(f).get("r", DEFAULT_RANK))
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, or a rank that is no number
        raise ValidationError(f"adapter {folder}: adapter_config.json is not a peft adapter config ({e})") from None


class Adapters:
    """Every adapter a request may name. `registry` is the folder the workers share, or None when the
    endpoint takes no registrations (started without ENABLE_LORA, or serving a custom predict_fn)."""

    def __init__(self, fixed: dict[str, str], registry: Path | None = None, max_rank: int = 0,
                 source_root: Path = Path("/opt/ml")):
        self.fixed = {name: Adapter(name, number, Path(path))
                      for number, (name, path) in enumerate(sorted(fixed.items()), 1)}
        self.registry = registry
        self.max_rank = max_rank  # the engine's max_lora_rank: a registered adapter above it cannot load
        self.source_root = source_root  # a registration's src must lie under it

    def names(self) -> list[str]:
        """Every adapter a request may name: the fixed ones and those registered since the start."""
        registered = [p.stem for p in self.registry.glob("*.json")] if self.registry is not None else []
        return sorted(set(self.fixed) | set(registered))

    def for_request(self, request: GenerateRequest) -> Adapter | None:
        """The adapter a request asks for (TGI's adapter_id, OpenAI's model, SageMaker's adapter header),
        or the model directory's own adapter, or none. A name that is no adapter here is a 422, never the
        base model's answer: on an endpoint that serves adapters, an OpenAI `model` is one of them or the
        served model's own name."""
        name = self.requested(request)
        if name is None:
            return self.fixed.get(MODEL_ADAPTER)
        adapter = self.find(name)
        if adapter is not None and name not in self.fixed and not request.by_header:
            adapter = None  # a registered component: only SageMaker's header reaches it (module docstring)
        if adapter is None:  # the other adapters' names are not this caller's to know
            if request.params.adapter_id is None:
                raise ValidationError(f"unknown model {name!r}: name an adapter this endpoint serves, or "
                                      f"{MODEL_NAME!r} for the model itself")
            raise ValidationError(f"unknown adapter {name!r}")
        return adapter

    def requested(self, request: GenerateRequest) -> str | None:
        """The adapter name a request gives: TGI's adapter_id (where SageMaker's header puts its own), else an
        OpenAI `model` that is not the served model's own name, on an endpoint that serves adapters."""
        if request.params.adapter_id is not None:
            return request.params.adapter_id
        if request.model not in (None, *NEUTRAL_MODELS) and self.serves_adapters:
            return request.model
        return None

    @property
    def serves_adapters(self) -> bool:
        return bool(self.fixed) or self.registry is not None

    def find(self, name: str) -> Adapter | None:
        if name in self.fixed:
            return self.fixed[name]
        if self.registry is None or not NAME.fullmatch(name or ""):
            return None
        return self._read(self.registry / f"{name}.json")

    def registered(self) -> list[Adapter]:
        """The registered adapters, by name (the current version of each)."""
        if self.registry is None:
            return []
        found = (self._read(path) for path in sorted(self.registry.glob("*.json")))
        return [adapter for adapter in found if adapter is not None]

    def current(self) -> dict[str, Adapter]:
        """Every adapter's current version, fixed and registered: what an engine may keep loaded."""
        return {**self.fixed, **{adapter.name: adapter for adapter in self.registered()}}

    def listing(self, loaded: Callable[[], dict[int, tuple[str, bool]]], query: Mapping[str, str],
                only: str | None = None) -> dict:
        """GET /adapters: each registered adapter (only `only`, when SageMaker's adapter header names one),
        and what this worker's engine holds of it; `loaded()`: the engine's adapters, number -> (name,
        pinned). Paged as AWS's SageMakerListLoRAAdaptersRequest: `limit`, then `next_page_token`."""
        bounds = {}
        for key, default in (("limit", LIST_LIMIT), ("next_page_token", 0)):
            raw = query.get(key, str(default))
            if not raw.isdigit() or (key == "limit" and int(raw) < 1):
                raise BadRequest(f"'{key}' must be a {'positive' if key == 'limit' else 'non-negative'} integer, "
                                 f"got {raw[:40]!r}")
            bounds[key] = int(raw)
        registered = [a for a in self.registered() if only is None or a.name == only]
        start, end = bounds["next_page_token"], bounds["next_page_token"] + bounds["limit"]
        engine = loaded() if registered[start:end] else {}
        page = {"adapters": [self._row(adapter, engine) for adapter in registered[start:end]]}
        if end < len(registered):
            page["next_page_token"] = str(end)
        return page

    @staticmethod
    def _row(adapter: Adapter, loaded: dict[int, tuple[str, bool]]) -> dict:
        state = loaded.get(adapter.number)
        older = [n for n, (other, _) in loaded.items() if other == adapter.name and n != adapter.number]
        return {"name": adapter.name, "src": str(adapter.path), "alias": adapter.alias, "pin": adapter.pin,
                "preload": adapter.preload, "loaded": state is not None, "pinned": state is not None and state[1],
                "older_versions_loaded": len(older)}

    def register(self, name: str, src: str, load: Callable[[Adapter], ContextManager], pin: bool = False,
                 preload: bool = True, alias: str | None = None) -> dict:
        """SageMaker's adapter component arriving: check it, `load` it into this worker's engine (so an
        adapter the engine cannot load fails here rather than on a user's request; `load` holds it there
        until its record is written), then record it for every worker. A name registered before is
        replaced: its record names the new version from then on."""
        if self.registry is None:
            raise BadRequest("this endpoint cannot take adapters: it was started without ENABLE_LORA=true (set "
                             "it on the base model; `launch deploy --adapter` does), or a custom predict_fn serves it")
        if not NAME.fullmatch(name or ""):
            raise BadRequest(f"adapter name {name!r} is not valid: 1-128 letters, digits, '.', '_' or '-'")
        if name in RESERVED_NAMES:
            raise BadRequest(f"adapter name {name!r} is reserved: it names the served model itself")
        if name in self.fixed:
            raise BadRequest(f"adapter {name!r} is already served from LORA_ADAPTERS")
        folder = adapter_folder(src, self.source_root)
        rank = adapter_rank(folder)
        if rank > self.max_rank:
            raise ValidationError(f"adapter {name!r} has LoRA rank {rank}, above this endpoint's MAX_LORA_RANK="
                                  f"{self.max_rank}: redeploy the base with MAX_LORA_RANK={rank} or more")
        adapter = Adapter(name, self._next_id(), folder, pin=pin, preload=preload or pin, alias=alias)
        with load(adapter):  # loaded here first: other workers only ever see an adapter that loaded
            descriptor, staging = tempfile.mkstemp(dir=self.registry, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:  # its own file: registrations may race
                json.dump({"name": name, "src": str(folder), "id": adapter.number, "pin": adapter.pin,
                           "preload": adapter.preload, "alias": alias}, f)
            os.replace(staging, self.registry / f"{name}.json")
        log.info("adapter %s registered from %s (pin %s, preload %s)", name, folder, adapter.pin, adapter.preload)
        return {"name": name, "src": str(folder), "pin": adapter.pin, "preload": adapter.preload,
                "message": f"Adapter {alias or name} registered"}

    def unregister(self, name: str, unload: Callable[[Adapter], None], alias: str | None = None) -> dict:
        """Forget `name` for every worker and `unload` it from this one; NotFound when it is not registered."""
        if self.registry is None:
            raise NotFound(f"adapter {alias or name!r} is not registered: this endpoint takes no adapters "
                           "(ENABLE_LORA)")
        adapter = self.find(name) if name not in self.fixed else None
        if adapter is None:
            raise NotFound(f"adapter {alias or name!r} is not registered")
        (self.registry / f"{name}.json").unlink(missing_ok=True)
        unload(adapter)
        log.info("adapter %s unregistered", name)
        return {"name": name, "message": f"Adapter {alias or name} unregistered"}

    def _next_id(self) -> int:
        """A vLLM id no registration on this instance had before, in any worker: vLLM keys its loaded
        adapters and its prefix cache by it, so two versions sharing one would answer from each other's weights.
        The counter is replaced whole under a lock, and never below the registry's own ids: a worker killed
        mid-write leaves the old count, not an empty file that would start again from the first id."""
        with open(self.registry / f"{NEXT_ID_FILE}.lock", "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the workers register concurrently; let go when the file closes
            counter = self.registry / NEXT_ID_FILE
            recorded = counter.read_text(encoding="utf-8").strip() if counter.is_file() else ""
            highest = max((adapter.number for adapter in self.registered()), default=FIRST_REGISTERED_ID - 1)
            number = max(int(recorded) if recorded.isdigit() else FIRST_REGISTERED_ID, highest + 1)
            staging = counter.with_name(f"{NEXT_ID_FILE}.tmp")
            staging.write_text(str(number + 1), encoding="utf-8")
            os.replace(staging, counter)
        return number

    @staticmethod
    def _read(path: Path) -> Adapter | None:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # unregistered meanwhile
            return None
        return Adapter(entry["name"], int(entry["id"]), Path(entry["src"]), pin=entry.get("pin", False),
                       preload=entry.get("preload", False), alias=entry.get("alias"))
