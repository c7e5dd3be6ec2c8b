"""Small exchanges between the processes of a job, through the
`jax.distributed` key-value store.

Everything a `Buffer` shares while it is set up (host ids, CUDA IPC handles,
the NVSHMEM unique id, barriers) goes through here, never through an XLA
collective: NCCL refuses two processes on one GPU ("Duplicate GPU detected"),
and several ranks per GPU is how the multi-rank kernels are checked on
one-GPU machines. Every call is collective over all the job's processes, in
the same order on each: the calls are numbered, which keeps every key unique.
A process that does not arrive within the timeout is named in the error.
"""

from __future__ import annotations

import itertools
import threading

import jax

TIMEOUT_S = 300.0
_calls = itertools.count()
_lock = threading.Lock()


def _client():
  return jax._src.distributed.global_state.client  # pylint: disable=protected-access


def _key(what: str) -> str:
  with _lock:
    return f"jax_ep/{next(_calls)}/{what}"


def _get(client, key: str, process: int, what: str,
         timeout_s: float) -> bytes:
  try:
    return client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
  except Exception as e:  # the client raises its runtime's own error type
    raise RuntimeError(
        f"jax_ep: process {jax.process_index()} waited {timeout_s:.0f} s for "
        f"process {process}'s {what} (key {key!r}) in vain; every process "
        "must create the same Buffers in the same order") from e


def allgather(what: str, value: bytes, *,
              timeout_s: float = TIMEOUT_S) -> list[bytes]:
  """Every process's `value`, in process order (collective)."""
  client = _client()
  if client is None or jax.process_count() == 1:
    return [value]
  key = _key(what)
  client.key_value_set_bytes(f"{key}/{jax.process_index()}", value)
  return [value if p == jax.process_index() else
          _get(client, f"{key}/{p}", p, what, timeout_s)
          for p in range(jax.process_count())]


def broadcast(what: str, make, root: int = 0, *,
              timeout_s: float = TIMEOUT_S) -> bytes:
  """`make()` as process `root` returns it, on every process (collective);
  only the root calls `make`."""
  client = _client()
  if client is None or jax.process_count() == 1:
    return make()
  key = _key(what)
  if jax.process_index() == root:
    value = make()
    client.key_value_set_bytes(key, value)
    return value
  return _get(client, key, root, what, timeout_s)


def barrier(what: str, *, timeout_s: float = TIMEOUT_S) -> None:
  """Returns once every process has reached the same barrier (collective)."""
  allgather(what, b"", timeout_s=timeout_s)
