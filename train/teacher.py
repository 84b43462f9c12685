"""The teacher that writes instructions=auto's instructions: vLLM in a child process, or transformers.

vLLM runs in its own process (`python -m train.teacher REQUEST RESULT`): its engine, KV cache and worker
processes are gone when it exits, before the job loads the model it trains, on the GPU and on the CPU alike.
Where vLLM is not installed (a bare GPU machine), the same work runs in this process with transformers,
greedy, a batch at a time: slower, the same rows.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from container.cpu_features import cpu_dtype
from train.data import read_jsonl, write_jsonl
from train.instructions import Teacher, backtranslate

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: tens of thousands of tokens for a small teacher; passages go in batches
GPU_MEMORY_SHARE = 0.85  # the training model is not loaded yet: the teacher may take most of the GPU


def engine_name() -> str:
    return "vLLM" if importlib.util.find_spec("vllm") is not None else "transformers"


def write_instructions(teacher: Teacher, passages: list[str], max_model_len: int) -> list[tuple[str, float]]:
    """(instruction, score) per passage (train/instructions.py), through vLLM's child process or transformers.
    The child writes its result whole or not at all (write_jsonl), so a result there is the whole work: a
    child that then fails on its way out (vLLM's CPU engine has aborted now and then here as it shut down,
    std::terminate after killing its engine process) costs a warning, not the job."""
    if engine_name() == "transformers":
        return backtranslate(passages, TransformersEngine(teacher))
    with tempfile.TemporaryDirectory(prefix="teacher-") as folder:
        request, result = Path(folder) / "request.json", Path(folder) / "result.jsonl"
        request.write_text(json.dumps({"teacher": teacher.__dict__, "passages": passages,
                                       "max_model_len": max_model_len}), encoding="utf-8")
        code = _run_child(child_command(request, result))
        if not result.is_file():
            raise RuntimeError(f"the teacher's vLLM engine ({teacher.source}) {_how_it_ended(code)}: its log is "
                               "above")
        if code != 0:
            log.warning("the teacher's vLLM engine %s after writing every row: the rows are used",
                        _how_it_ended(code))
        return [(row["instruction"], row["score"]) for row in read_jsonl(result)]


def child_command(request: Path, result: Path) -> list[str]:
    return [sys.executable, "-m", "train.teacher", str(request), str(result)]


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"failed with exit code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _run_child(command: list[str]) -> int:
    """The child's exit code. It leads a process group of its own (vLLM's engine and worker processes join
    it), killed whole once the child is gone, so none of them outlives it into training, whatever ended it."""
    environment = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_CPU_NUM_OF_RESERVED_CPU":
                   os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
    child = subprocess.Popen(command, env=environment, start_new_session=True)
    try:
        return child.wait()  # a SIGTERM raises here (train/stop.py): the finally below ends the child
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # the usual end: vLLM shut its processes down and the group is empty
            pass
        child.wait()


class VllmEngine:
    """vLLM's offline engine: greedy instructions, and prompt log-probabilities for the scores."""

    def __init__(self, teacher: Teacher, max_model_len: int):
        import torch
        from vllm import LLM

        cpu = not torch.cuda.is_available()
        arguments = dict(model=teacher.source, revision=teacher.revision, trust_remote_code=teacher.trust_remote_code,
                         dtype=cpu_dtype() if cpu else "auto", enforce_eager=cpu, load_format="safetensors", seed=0,
                         max_model_len=min(max_model_len, _model_max_length(teacher) or max_model_len),
                         enable_prefix_caching=False, disable_log_stats=True)
        if cpu:
            arguments["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        else:
            arguments["gpu_memory_utilization"] = GPU_MEMORY_SHARE
        self.llm = LLM(**arguments)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        from vllm import SamplingParams

        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                                    SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def mean_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[float]:
        from vllm import SamplingParams

        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences],
                                    SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        means = []
        for output, ids, start in zip(outputs, sequences, starts):
            values = [output.prompt_logprobs[i][ids[i]].logprob for i in range(max(start, 1), len(ids))]
            means.append(sum(values) / len(values) if values else 0.0)
        return means


class TransformersEngine:
    """The same two calls with transformers, in this process."""

    def __init__(self, teacher: Teacher, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = dict(revision=teacher.revision, trust_remote_code=teacher.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(teacher.source, **options)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(teacher.source, dtype=dtype, use_safetensors=True,
                                                          **options).to(device).eval()
        self.batch_size = batch_size

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.model.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                          do_sample=False, pad_token_id=pad)
            texts += self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return texts

    def mean_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[float]:
        import torch

        means = []
        for ids, start in zip(sequences, starts):
            tokens = torch.tensor([ids], device=self.model.device)
            with torch.no_grad():
                logits = self.model(input_ids=tokens).logits[0, :-1].float()
            chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None])[:, 0]
            answer = chosen[max(start, 1) - 1:]
            means.append(answer.mean().item() if answer.numel() else 0.0)
        return means


def _model_max_length(teacher: Teacher) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher.source, revision=teacher.revision,
                                        trust_remote_code=teacher.trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def main() -> None:
    """The child process: REQUEST (the teacher, the passages) in, RESULT ((instruction, score) pairs) out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    request_file, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    request = json.loads(request_file.read_text(encoding="utf-8"))
    engine = VllmEngine(Teacher(**request["teacher"]), request["max_model_len"])
    made = backtranslate(request["passages"], engine)
    write_jsonl([{"instruction": instruction, "score": score} for instruction, score in made], result_file)


if __name__ == "__main__":  # vLLM spawns its engine process: the work must not run again on import
    main()
