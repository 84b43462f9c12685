"""Which 16-bit type the CPU computes natively, for the CPU runs of vLLM (serving, the teacher).

bf16 is fast on a CPU only where it has bf16 instructions: AVX-512 BF16 or AMX on x86, BF16 on Arm. Elsewhere
torch and vLLM's CPU kernels convert every value and float32 is the fast type: on a 2-core AVX2-only EPYC,
SmolLM2-135M in vLLM made 21 tokens/s greedy in bf16 against 130 in float32 (32 prompts, 64 new tokens), and
one bf16 matmul took 45x the float32 one. The flags are read from /proc/cpuinfo, Linux's own list.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)
CPUINFO = Path("/proc/cpuinfo")


def native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the first CPU's flags (x86 "flags", Arm "Features") name a bf16 instruction set."""
    try:
        lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:  # not Linux: no way to tell, and float32 is never slow
        return False
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return not BF16_FLAGS.isdisjoint(value.split())
    return False


def cpu_dtype(cpuinfo: Path = CPUINFO) -> str:
    """The engine's dtype for a CPU run with DTYPE=auto: bf16 where native, float32 elsewhere."""
    return "bfloat16" if native_bf16(cpuinfo) else "float32"
