"""The CUDA extension is built wherever nvcc is: a kernel that does not
compile must fail the build, not silently leave the reference backend."""

import os
import shutil

import pytest

from jax_ep._src import native


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(os.environ.get("JAX_EP_ENABLE_CUDA", "AUTO") == "OFF",
                    reason="built with JAX_EP_ENABLE_CUDA=OFF")
def test_extension_is_built_where_nvcc_is():
  module = native.extension()
  assert module is not None, native.unavailable_reason()
  assert {"jax_ep_get_dispatch_layout", "jax_ep_intranode_dispatch"} <= set(
      module.registrations())


def test_missing_extension_has_a_reason_or_loads():
  assert (native.extension() is None) == bool(native.unavailable_reason())
