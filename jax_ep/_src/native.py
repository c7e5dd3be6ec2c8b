"""The compiled extension `jax_ep._jax_ep` and its XLA FFI targets.

The extension is optional: a build without CUDA installs the pure-Python
package only. Nothing here raises when it is missing; callers that need the
kernels ask `extension()` and report `unavailable_reason()`.
"""

from __future__ import annotations

import functools
import importlib
import threading
import types

import jax

_MODULE = "jax_ep._jax_ep"
_register_lock = threading.Lock()
_registered = False


@functools.cache
def _load() -> tuple[types.ModuleType | None, str]:
  try:
    return importlib.import_module(_MODULE), ""
  except ModuleNotFoundError as e:
    if e.name != _MODULE:
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
