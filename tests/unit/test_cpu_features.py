"""The CPU's native bf16, read from /proc/cpuinfo lines as x86 and Arm kernels write them."""

import pytest

from container.cpu_features import cpu_dtype, native_bf16

EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2 sha_ni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ICE_LAKE = "flags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics asimddp\n"


@pytest.mark.parametrize("cpuinfo, dtype", [(EPYC_AVX2, "float32"), (ICE_LAKE, "float32"),
                                            (SAPPHIRE_RAPIDS, "bfloat16"), (GRAVITON3, "bfloat16"),
                                            (GRAVITON2, "float32"), ("", "float32")])
def test_bf16_only_where_the_cpu_has_bf16_instructions(tmp_path, cpuinfo, dtype):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_dtype(path) == dtype and native_bf16(path) == (dtype == "bfloat16")


def test_no_cpuinfo_means_float32(tmp_path):
    assert cpu_dtype(tmp_path / "absent") == "float32"
