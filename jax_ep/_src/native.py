"""The compiled modules of jax_ep: the extension `jax_ep._jax_ep` with its
XLA FFI targets, and `jax_ep._jax_ep_sizes`, the kernels' limits and buffer
sizes.

The extension is optional: a build without CUDA installs the package without
it. Nothing here raises when it is missing; callers that need the kernels ask
`extension()` and report `unavailable_reason()`. The sizes module is built by
every install (it needs a C++ compiler, not CUDA); `sizes_module()` raises
when it is missing.
"""

from __future__ import annotations

import functools
import importlib
import threading
import types

import jax

_EXTENSION = "jax_ep._jax_ep"
_SIZES_MODULE = "jax_ep._jax_ep_sizes"
_register_lock = threading.Lock()
_registered = False


@functools.cache
def _load() -> tuple[types.ModuleType | None, str]:
  try:
    return importlib.import_module(_EXTENSION), ""
  except ModuleNotFoundError as e:
    if e.name != _EXTENSION:
      return None, f"failed to import: {e}"
    return None, (
        "not built (this install of jax_ep has no CUDA kernels: it was built "
        "with JAX_EP_ENABLE_CUDA=OFF or without nvcc on PATH)")
  except ImportError as e:
    return None, f"failed to import: {e}"


def extension() -> types.ModuleType | None:
  """The extension module, or None when it is missing or fails to import."""
  return _load()[0]


def unavailable_reason() -> str:
  """Why `extension()` is None, in a phrase; "" when the extension loaded."""
  return _load()[1]


def sizes_module() -> types.ModuleType:
  """The module `jax_ep._jax_ep_sizes` (xla_ffi/sizes_module.cc).

  Raises:
    ImportError: it is not built, as in a checkout used without installing.
  """
  try:
    return importlib.import_module(_SIZES_MODULE)
  except ModuleNotFoundError as e:
    if e.name != _SIZES_MODULE:
      raise
    raise ImportError(
        f"{_SIZES_MODULE} is not built: install jax_ep with pip, which "
        "builds it with or without CUDA (it needs a C++ compiler)") from e


def register_targets() -> bool:
  """Registers every FFI target of the extension with XLA for CUDA, once.

  Returns:
    True when the targets are registered (now or by an earlier call), False
    when the extension is missing (see `unavailable_reason()`).
  """
  global _registered
  module = extension()
  if module is None:
    return False
  with _register_lock:
    if not _registered:
      for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
      _registered = True
  return True


def require_targets(op: str) -> None:
  """`register_targets()`, or a RuntimeError naming the public `op` and why
  the extension is missing."""
  if not register_targets():
    raise RuntimeError(
        f"jax_ep.{op}: the CUDA kernels are unavailable (jax_ep._jax_ep: "
        f"{unavailable_reason()})")
