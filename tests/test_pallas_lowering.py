"""Offline proof that every Pallas kernel lowers for GPU (Triton) and TPU (Mosaic) from a CPU host.

Each case lowers the forward and the backward (forward, dQ and dK/dV kernels) inside an abstract
device mesh (an abstract H100 or TPU v5e, see ``jaxla.attention._pallas_lower``) and counts the
kernels by the custom-call target a one-line Pallas kernel exports on that platform. The grid is
sampled so that every dtype, head dim 64/128/256, Hv != H, GQA/MQA, causal, window, soft cap,
segments, lengths, T = 1 and T = 16k appears on both backends; each case is one lowering (no
compile), well under a second. ``jaxla/benchmarks/triton_compile.py`` compiles the Triton IR.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxla.attention import _pallas
from jaxla.attention import _pallas_common as c
from jaxla.attention import _pallas_lower as lower
from jaxla.attention._args import canonical_args

pytestmark = pytest.mark.lowering

Case = lower.Case
CASES = [
    Case("bf16 h128 gqa causal lengths", causal=True, lengths=True),
    Case("f16 h64 window softcap", dtype="float16", h=64, window=(64, 32), softcap=3.0),
    Case("f32 h256 segments", dtype="float32", h=256, n=4, k=4, segments=True),
    Case("bf16 h64 hv256 causal", h=64, hv=256, causal=True),
    Case("f16 h256 hv128 mqa window", dtype="float16", h=256, hv=128, k=1, window=(100, 0)),
    Case("f32 h64 causal softcap lengths", dtype="float32", h=64, causal=True, softcap=20.0,
         lengths=True),
    Case("bf16 h256 causal segments window", h=256, n=4, k=2, causal=True, segments=True,
         window=(128, 0)),
    Case("bf16 T=1 decode gqa", t=1, s=300, lengths=True),
    Case("bf16 T=1 S=1 causal", t=1, s=1, causal=True),
    Case("bf16 T=16k causal h128", b=1, t=16384, s=16384, n=16, k=16, causal=True),
    Case("f16 T=16k window h64 gqa", dtype="float16", b=1, t=16384, s=16384, n=8, k=2, h=64,
         window=(1024, 0)),
]
IDS = [case.name for case in CASES]


def _tpu_case(case: Case) -> Case:
    # TPUs decline float16 (no f16 VPU/MXU path): the same shapes run in bfloat16 there.
    return case._replace(dtype="bfloat16") if case.dtype == "float16" else case


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_the_pallas_target_is_read_from_a_lowered_module(platform):
    target = lower.pallas_target(platform)
    assert target and lower.pallas_target(platform) == target  # cached, one lowering


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_lowering(case):
    text = lower.lower_case("gpu", case)
    assert lower.count_kernels("gpu", text) == 3, lower.custom_call_targets(text)
    for name in ("jaxla_flash_fwd", "jaxla_flash_dq", "jaxla_flash_dkdv"):
        assert f'name = "{name}"' in text


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mosaic_lowering(case):
    text = lower.lower_case("tpu", _tpu_case(case))
    assert lower.count_kernels("tpu", text) == 3, lower.custom_call_targets(text)


def test_forward_alone_is_one_kernel():
    case = CASES[0]
    for platform in ("gpu", "tpu"):
        assert lower.count_kernels(platform, lower.lower_case(platform, case, grad=False)) == 1


def test_triton_launch_options_reach_the_kernel():
    sizes = _pallas.BlockSizes(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=3,
                               num_warps_bwd=4, num_stages_bwd=1)
    text = lower.lower_case("gpu", CASES[0], block_sizes=sizes)
    assert text.count("num_warps = 8 : i32") == 1 and text.count("num_stages = 3 : i32") == 1
    assert text.count("num_warps = 4 : i32") == 2 and text.count("num_stages = 1 : i32") == 2


def test_block_sizes_below_the_backend_floor_are_refused():
    case = CASES[0]
    with pytest.raises(ValueError, match=r"too small for the triton backend: block_q=8 .*at least 16"):
        lower.lower_case("gpu", case, block_sizes=_pallas.BlockSizes(block_q=8))
    with pytest.raises(ValueError, match=r"too small for the mosaic backend: block_k=64.*at least 128"):
        lower.lower_case("tpu", case, block_sizes=_pallas.BlockSizes(128, 64, 128, 128, 128, 128))
    with pytest.raises(ValueError, match="num_warps must be a power of two, got 6"):
        _pallas.BlockSizes(num_warps=6)
    with pytest.raises(ValueError, match="num_warps_bwd must be a power of two, got 3"):
        _pallas.BlockSizes(num_warps_bwd=3)


def test_tpu_declines_float16_with_a_reason():
    x = jnp.zeros((1, 16, 2, 128), jnp.float16)
    reason = _pallas.unsupported_reason(canonical_args(x, x, x), platform="tpu")
    assert reason is not None and "float16" in reason
    assert _pallas.unsupported_reason(canonical_args(x, x, x), platform="gpu") is None


def test_causal_query_blocks_launch_longest_first_on_triton_only():
    plan_kw = dict(scale=1.0, causal=True, window_left=None, window_right=0, softcap=None,
                   t_len=512, s_len=512, t_pad=512, s_pad=512, groups=1, has_segments=False,
                   layout="btnh", block_q=128, block_k=128, block_q_dq=64, block_k_dq=64,
                   block_q_dkv=64, block_k_dkv=64, num_warps=4, num_stages=2, num_warps_bwd=4,
                   num_stages_bwd=2, highest_precision=False)
    reversed_plan = c.Plan(backend="triton", reverse_q_blocks=True, **plan_kw)
    assert [reversed_plan and c.q_block_order(reversed_plan, 4)(i) for i in range(4)] == [3, 2, 1, 0]
    plain = c.Plan(backend="mosaic", **plan_kw)
    assert [c.q_block_order(plain, 4)(i) for i in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("case", [
    Case("T=16k gqa causal", b=1, t=16384, s=16384, n=16, k=4, causal=True),
    Case("T=16k h256 segments", b=1, t=16384, s=16384, n=4, k=1, h=256, segments=True),
], ids=lambda case: case.name)
def test_mosaic_kernels_stream_key_and_query_blocks(case):
    """No TPU kernel holds a whole sequence in VMEM: the last grid axis walks the blocks.

    The VMEM a step needs (inputs/outputs double-buffered, plus scratch) stays a few MiB at T = 16k,
    far under v5e's 16 MiB default scoped limit, and stats/accumulators live in 128-lane scratch.
    """
    launches = lower.kernel_launches("tpu", case)
    assert len(launches) == 3
    for launch in launches:
        semantics = launch.compiler_params.dimension_semantics
        assert len(launch.grid) == 4 and tuple(semantics)[-1] == "arbitrary", launch
        vmem = 2 * sum(launch.block_bytes) + launch.scratch_bytes
        assert vmem <= 4 * 2**20, (launch.grid, launch.block_bytes, launch.scratch_bytes)


def test_the_triton_deprecation_warning_shows_once():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("ignore", DeprecationWarning)  # Python's default outside __main__
        c.show_triton_deprecation_once()
        for line in range(3):  # as jax warns on every lowering, from several call sites
            warnings.warn_explicit(f"{c.TRITON_DEPRECATION} and will be removed", DeprecationWarning,
                                   "jax/_src/pallas/pallas_call.py", 960 + line)
    assert len(caught) == 1
