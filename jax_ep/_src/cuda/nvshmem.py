"""The NVSHMEM heap of the low-latency kernels and of the internode exchange
(csrc/runtime/nvshmem_heap.cuh).

`open_heap` is collective over the processes of the EP axis, which must each
drive exactly one of its GPUs (NVSHMEM runs one PE per process). EP rank 0
draws NVSHMEM's unique id and shares it through the `jax.distributed`
key-value store; every process then initializes NVSHMEM as PE = its EP rank
and allocates the symmetric heap, zeroed.

NVSHMEM maps its heap outside JAX's memory pool: JAX must leave that much GPU
memory free (its default preallocation of 75% does on 80 GB and larger GPUs;
otherwise lower `XLA_PYTHON_CLIENT_MEM_FRACTION`). NVSHMEM and JAX's CUDA
plugin share one `libnvshmem_host.so.3` (the pip package's), which NVSHMEM
initializes once per process: jax_ep's heap beside XLA's own NVSHMEM
collectives (off by default) is untested.
"""

from __future__ import annotations

import os
import threading

import jax

from jax_ep._src import exchange
from jax_ep._src import native

# NVSHMEM's own allocations (signals, teams) on top of our heap.
_HEAP_SLACK = 256 << 20


def rdma_environment(*, qps_per_rank: int | None = None,
                     service_level: int | None = None,
                     traffic_class: int | None = None) -> dict[str, str]:
  """NVSHMEM's environment for the `Buffer`'s RDMA settings (None: NVSHMEM's
  default): queue pairs per peer (`NVSHMEM_IBGDA_NUM_RC_PER_PE`, IBGDA), the
  InfiniBand service level (`NVSHMEM_IB_SL`, 0-15) and traffic class
  (`NVSHMEM_IB_TRAFFIC_CLASS`, 0-255). `open_heap` applies them where the
  environment does not already set them.

  Raises:
    ValueError: a setting outside its range, naming it.
  """
  settings = (("rdma_qps_per_rank", qps_per_rank, 1, 1 << 10,
               "NVSHMEM_IBGDA_NUM_RC_PER_PE"),
              ("rdma_service_level", service_level, 0, 15, "NVSHMEM_IB_SL"),
              ("rdma_traffic_class", traffic_class, 0, 255,
               "NVSHMEM_IB_TRAFFIC_CLASS"))
  env = {}
  for name, value, low, high, variable in settings:
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or not (
        low <= value <= high):
      raise ValueError(f"jax_ep.Buffer: {name} must be an int in [{low}, "
                       f"{high}], got {value!r}")
    env[variable] = str(value)
  return env

_lock = threading.Lock()
_open: "NvshmemHeap | None" = None


class NvshmemHeap:
  """This process's open NVSHMEM heap; `close()` (collective) finalizes it."""

  def __init__(self, num_ranks: int, ll_bytes: int, exchange_bytes: int):
    self.num_ranks = num_ranks
    self.ll_bytes = ll_bytes  # the low-latency kernels' part
    self.exchange_bytes = exchange_bytes  # the internode exchange's part
    self.closed = False

  def close(self) -> None:
    global _open
    with _lock:
      if self.closed:
        return
      self.closed = True
      _open = None
    native.extension().nvshmem_close()


def open_heap(devices_in_rank_order: list[jax.Device], ll_bytes: int,
              exchange_bytes: int = 0,
              environment: dict[str, str] | None = None) -> NvshmemHeap:
  """Initializes NVSHMEM over the EP devices and allocates the heap: `ll_bytes`
  for the low-latency kernels, `exchange_bytes` for the internode exchange
  (collective). `environment` (e.g. `rdma_environment`'s) is applied before
  NVSHMEM starts, where the process's environment does not set it already.

  Raises:
    ValueError: a process drives more or fewer than one EP device, a heap is
      already open with other sizes, or NVSHMEM refused (the message says why).
  """
  global _open
  devices = list(devices_in_rank_order)
  mine = [r for r, d in enumerate(devices)
          if d.process_index == jax.process_index()]
  processes = [d.process_index for d in devices]
  if len(mine) != 1 or len(set(processes)) != len(devices):
    raise ValueError(
        "jax_ep NVSHMEM kernels (low-latency, internode) need one process per "
        "GPU of the "
        f"EP axis; this process drives {len(mine)} of its {len(devices)} "
        "devices. Launch one process per GPU (e.g. python -m jax_ep.launch -n "
        "<GPUs> -- ...) or use the reference backend")
  rank = mine[0]
  with _lock:
    if _open is not None and not _open.closed:
      if (_open.ll_bytes >= ll_bytes and
          _open.exchange_bytes >= exchange_bytes and
          _open.num_ranks == len(devices)):
        return _open
      raise ValueError(
          "jax_ep: an NVSHMEM heap of "
          f"{_open.ll_bytes} + {_open.exchange_bytes} bytes is already open "
          "in this process; close its Buffer before opening one with other "
          "sizes")
    module = native.extension()
    # NVSHMEM sizes its symmetric region from the environment at init.
    num_bytes = int(ll_bytes) + int(exchange_bytes)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(num_bytes + _HEAP_SLACK))
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    for variable, value in (environment or {}).items():
      os.environ.setdefault(variable, value)
    uid = exchange.broadcast("NVSHMEM unique id", module.nvshmem_unique_id,
                             root=devices[0].process_index)
    module.nvshmem_open(uid, rank, len(devices),
                        devices[rank].local_hardware_id, int(ll_bytes),
                        int(exchange_bytes))
    # Not closed at exit: nvshmem_finalize waits for every PE, and a peer
    # that failed would hang this one; the process's end frees the heap.
    _open = NvshmemHeap(len(devices), int(ll_bytes), int(exchange_bytes))
    return _open
