"""The kernels' limits and buffer sizes, as Python reads them from C++.

csrc defines them once (common/limits.h and the buffer layouts); the module
`jax_ep._jax_ep_sizes`, which every install builds with or without CUDA,
hands them to Python. So the sizing helpers answer without the CUDA
extension, and the kernel modules' trace-time checks refuse one past each
exported limit.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import jax_ep
from jax_ep._src import checks
from jax_ep._src import runtime
from jax_ep._src import sizes
from jax_ep._src.cuda import internode
from jax_ep._src.cuda import intranode
from jax_ep._src.cuda import layout as cuda_layout
from jax_ep._src.cuda import low_latency

NVL_SHAPE = (4096, 7168, 8, 8)  # T, H, K, R
LL_SHAPE = (128, 7168, 288)  # Tmax, H, E
LIMITS = sizes.limits()


def test_limits_are_positive_ints():
  assert LIMITS
  assert all(isinstance(v, int) and v > 0 for v in LIMITS.values()), LIMITS


def test_api_topk_bound_is_the_kernels():
  assert checks.MAX_TOPK == LIMITS["max_topk"]


def test_sizing_helpers_answer_without_the_cuda_extension():
  # A fresh interpreter in which jax_ep._jax_ep cannot be imported, as on an
  # install built without CUDA.
  code = f"""
import json, sys
sys.modules["jax_ep._jax_ep"] = None
import jax_ep
from jax_ep._src import native
print(json.dumps([native.unavailable_reason(),
                  jax_ep.nvl_buffer_bytes(*{NVL_SHAPE}),
                  jax_ep.ll_buffer_bytes(*{LL_SHAPE})]))
"""
  run = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=False)
  assert run.returncode == 0, run.stderr
  reason, nvl, ll = json.loads(run.stdout.splitlines()[-1])
  assert reason.startswith("not built"), reason
  assert nvl == jax_ep.nvl_buffer_bytes(*NVL_SHAPE) > 0
  assert ll == jax_ep.ll_buffer_bytes(*LL_SHAPE) > 0


def test_sizing_helpers_refuse_negative_sizes():
  with pytest.raises(ValueError, match="sizes must be >= 0"):
    jax_ep.nvl_buffer_bytes(-1, 7168, 8, 8)
  with pytest.raises(ValueError, match="sizes must be >= 0"):
    jax_ep.ll_buffer_bytes(128, -1, 288)


@pytest.mark.parametrize("num_experts, num_ranks", [
    (LIMITS["max_normal_experts"] + 1, 1),
    (LIMITS["max_ranks"] + 1, LIMITS["max_ranks"] + 1),
])
def test_layout_kernel_refuses_one_past_its_limits(num_experts, num_ranks):
  message = (f"the CUDA kernel supports num_experts <= "
             f"{LIMITS['max_normal_experts']} and num_ranks <= "
             f"{LIMITS['max_ranks']}, got {num_experts} and {num_ranks}")
  with pytest.raises(ValueError, match=re.escape(message)):
    cuda_layout.get_dispatch_layout(np.zeros((1, 1), np.int32),
                                    num_experts=num_experts,
                                    num_ranks=num_ranks)


@pytest.mark.parametrize("num_experts, num_ranks", [
    (LIMITS["max_normal_experts"] + 1, 1),
    (LIMITS["max_ranks"] + 1, LIMITS["max_ranks"] + 1),
])
def test_intranode_kernels_refuse_one_past_their_limits(num_experts,
                                                        num_ranks):
  message = (f"the intranode CUDA kernels support num_experts <= "
             f"{LIMITS['max_normal_experts']} and an EP size <= "
             f"{LIMITS['max_ranks']}, got num_experts={num_experts} on "
             f"{num_ranks} ranks")
  with pytest.raises(ValueError, match=re.escape(message)):
    intranode.dispatch((np.zeros((1, 8), np.float32),),
                       np.zeros((1, 1), np.int32), None, axis_name="ep",
                       num_ranks=num_ranks, num_experts=num_experts,
                       capacity=1, expert_alignment=1, buffers=None,
                       timeout_s=runtime.DEFAULT_TIMEOUT_S)


def test_internode_kernels_serve_past_the_other_kernels_ranks():
  """Dispatch and combine across nodes (DeepSeek-V3 trains at EP64; larger
  EP sizes want more) take EP sizes past every other kernel's; their flags
  cost the exchange region 520 bytes a rank."""
  most = LIMITS["max_internode_ranks"]
  assert most >= 256 and most > LIMITS["max_ranks"]
  assert sizes.rdma_buffer_bytes(1, 128, 1, 2) >= most * (8 + 64 * 8)
  kernels = internode.CudaInternode("ep", 1 << 40, 1, 10.0)
  message = (f"jax_ep.dispatch: the internode kernels serve an EP size <= "
             f"{most}, got {most + 1}")
  with pytest.raises(ValueError, match=re.escape(message)):
    kernels.dispatch((np.zeros((1, 128), np.float32),),
                     np.zeros((1, 1), np.int32), None, num_ranks=most + 1,
                     num_experts=most + 1, capacity=1, expert_alignment=1)


_TOKENS = LIMITS["max_low_latency_tokens"]
_SLOTS = LIMITS["max_low_latency_slots_per_expert"]


@pytest.mark.parametrize("shape, name, most, got", [
    (dict(max_tokens=_TOKENS + 1), "num_max_dispatch_tokens_per_rank",
     _TOKENS, _TOKENS + 1),
    (dict(max_tokens=_TOKENS, num_ranks=_SLOTS // _TOKENS + 1),
     "num_ranks * num_max_dispatch_tokens_per_rank", _SLOTS,
     _TOKENS * (_SLOTS // _TOKENS + 1)),
    (dict(num_ranks=LIMITS["max_ranks"] + 1), "the EP size",
     LIMITS["max_ranks"], LIMITS["max_ranks"] + 1),
    (dict(num_experts=LIMITS["max_low_latency_experts"] + 1), "num_experts",
     LIMITS["max_low_latency_experts"], LIMITS["max_low_latency_experts"] + 1),
    (dict(topk=LIMITS["max_topk"] + 1), "topk", LIMITS["max_topk"],
     LIMITS["max_topk"] + 1),
])
def test_low_latency_kernels_refuse_one_past_their_limits(shape, name, most,
                                                          got):
  args = dict(max_tokens=1, hidden=128, topk=1, num_experts=2, num_ranks=2)
  message = (f"jax_ep.low_latency_dispatch: the low-latency kernels need "
             f"{name} <= {most}, got {got}")
  with pytest.raises(ValueError, match=re.escape(message)):
    low_latency.check_shapes("low_latency_dispatch", 1 << 62,
                             **(args | shape))


def test_nvl_buffer_bytes_grow_with_the_shapes():
  small = sizes.nvl_buffer_bytes(128, 2048, 8, 2)
  big = sizes.nvl_buffer_bytes(4096, 7168, 8, 2)
  assert 4096 * 7168 * 2 <= big  # a slot of T bf16 rows for the one peer
  assert small < big
  assert sizes.nvl_buffer_bytes(4096, 7168, 8, 8) > 7 * 4096 * 7168 * 2
