"""NVLink peer buffers: one device allocation per EP rank, writable by all.

`create_peer_buffers` is collective: every JAX process calls it with the same
global list of devices, in EP rank order. Each process allocates the buffers
of its own devices (csrc/runtime/peer_buffers.cuh: a data region of
`num_bytes` plus a small control region), the processes exchange the CUDA IPC
handles through the key-value store (`exchange`), and every device then maps
every peer: through CUDA IPC when the peer belongs to another process, through
peer access when it belongs to this one. Both process models work (one process
per GPU, one process driving every GPU) and so do mixes of them, as long as
all ranks share one host.

The kernels find their device's buffers in a registry keyed by CUDA device
ordinal, so each device can belong to one set of peer buffers at a time.

JAX preallocates most GPU memory: leave room for the buffers with
`XLA_PYTHON_CLIENT_MEM_FRACTION` (e.g. 0.7) or
`XLA_PYTHON_CLIENT_PREALLOCATE=false`, set before JAX starts.
"""

from __future__ import annotations

import atexit
import threading

import jax
import numpy as np

from jax_ep._src import exchange
from jax_ep._src import native

_IPC_HANDLE_BYTES = 64


def _module():
  module = native.extension()
  if module is None:
    raise RuntimeError(
        "jax_ep peer buffers need the CUDA extension jax_ep._jax_ep: "
        f"{native.unavailable_reason()}")
  return module


def buffer_bytes(num_bytes: int, num_ranks: int) -> int:
  """Bytes one rank allocates for a data region of `num_bytes` (with control)."""
  return int(_module().peer_buffers_layout(num_bytes, num_ranks)["total_bytes"])


class PeerBuffers:
  """The peer buffers of this process's EP devices; `close()` frees them.

  Attributes:
    devices: every EP device, in rank order.
    num_bytes: size of each rank's data region, as requested.
    local_ranks: the ranks whose devices this process drives.
  """

  def __init__(self, devices: list[jax.Device], num_bytes: int,
               local_ranks: list[int]):
    self.devices = list(devices)
    self.num_bytes = num_bytes
    self.local_ranks = list(local_ranks)
    self._lock = threading.Lock()
    self._closed = False

  @property
  def num_ranks(self) -> int:
    return len(self.devices)

  @property
  def closed(self) -> bool:
    return self._closed

  def close(self) -> None:
    """Frees this process's buffers and peer mappings (idempotent).

    Collective in spirit: call it on every process once every op that uses
    the buffers has finished on every rank (e.g. after `block_until_ready`);
    a peer still writing into a freed buffer is undefined behaviour.
    """
    with self._lock:
      if self._closed:
        return
      self._closed = True
    module = _module()
    for rank in self.local_ranks:
      module.peer_buffers_close(self.devices[rank].local_hardware_id)
    atexit.unregister(self.close)

  def __enter__(self) -> PeerBuffers:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self):
    return (f"PeerBuffers(num_ranks={self.num_ranks}, num_bytes="
            f"{self.num_bytes}, local_ranks={self.local_ranks}, "
            f"closed={self._closed})")


def _check(devices, num_bytes: int) -> None:
  if not devices:
    raise ValueError("jax_ep.create_peer_buffers: devices must not be empty")
  if len(set(devices)) != len(devices):
    raise ValueError(
        f"jax_ep.create_peer_buffers: devices repeat: {list(devices)}")
  not_gpu = [d for d in devices if d.platform != "gpu"]
  if not_gpu:
    raise ValueError(
        "jax_ep.create_peer_buffers: every device must be a CUDA GPU, got "
        f"{not_gpu}")
  if not isinstance(num_bytes, (int, np.integer)) or num_bytes < 0:
    raise ValueError(
        "jax_ep.create_peer_buffers: num_bytes must be an int >= 0, got "
        f"{num_bytes!r}")


def _all_handles(local: dict[int, bytes], num_ranks: int,
                 process_of_rank: list[int]) -> bytes:
  """Every rank's IPC handle, in rank order (collective across processes)."""
  rows = np.zeros((num_ranks, _IPC_HANDLE_BYTES), np.uint8)
  for rank, handle in local.items():
    rows[rank] = np.frombuffer(handle, np.uint8)
  gathered = [np.frombuffer(b, np.uint8).reshape(num_ranks, -1) for b in
              exchange.allgather("CUDA IPC handles", rows.tobytes())]
  return np.stack([gathered[p][r] for r, p in
                   enumerate(process_of_rank)]).tobytes()


# The live buffers of each EP group this process created through
# `group_peer_buffers`, keyed by the group's device ids in rank order.
_GROUPS: dict[tuple[int, ...], PeerBuffers] = {}
_GROUPS_LOCK = threading.Lock()


def group_peer_buffers(devices_in_rank_order: list[jax.Device],
                       num_bytes: int) -> PeerBuffers:
  """The group's peer buffers with at least `num_bytes`, made once and shared
  by every `jax_ep.Buffer` over the same group (collective).

  A device has one set of buffers at a time. When a group needs more bytes,
  or its devices belong to another group's buffers, those are freed after
  every device has finished its queued work, then new ones are made; an
  older `Buffer` over the same group then runs on the new ones.
  """
  devices = list(devices_in_rank_order)
  key = tuple(d.id for d in devices)
  with _GROUPS_LOCK:
    live = _GROUPS.get(key)
    if live is not None and not live.closed and live.num_bytes >= num_bytes:
      return live
    stale = [k for k in _GROUPS if set(k) & set(key)]
    if stale:
      # No kernel may still touch a buffer we free, on any rank.
      for d in devices:
        if d.process_index == jax.process_index():
          jax.block_until_ready(jax.device_put(np.zeros(()), d) + 0)
      exchange.barrier("peer buffers: regrow")
      for k in stale:
        _GROUPS.pop(k).close()
    _GROUPS[key] = create_peer_buffers(devices, num_bytes)
    return _GROUPS[key]


def create_peer_buffers(devices_in_rank_order: list[jax.Device],
                        num_bytes: int) -> PeerBuffers:
  """Creates and opens the NVLink peer buffers of an EP group (collective).

  Args:
    devices_in_rank_order: every device of the EP axis, the same list on
      every process; device i is rank i. All on one host, CUDA GPUs, at most
      64.
    num_bytes: size of each rank's data region (the later dispatch/combine
      kernels' rows); the control region comes on top.

  Returns:
    A `PeerBuffers`; its `close()` (also run at interpreter exit) frees them.

  Raises:
    ValueError: bad devices or size, or a device that already has buffers.
    RuntimeError: a CUDA failure, e.g. cudaMalloc out of memory because JAX
      preallocated the GPU (the message says what to set).
  """
  devices = list(devices_in_rank_order)
  _check(devices, num_bytes)
  module = _module()
  num_ranks = len(devices)
  me = jax.process_index()
  process_of_rank = [d.process_index for d in devices]
  local_ranks = [r for r, p in enumerate(process_of_rank) if p == me]
  buffers = PeerBuffers(devices, int(num_bytes), [])
  created: dict[int, bytes] = {}
  try:
    for rank in local_ranks:
      created[rank] = module.peer_buffers_create(
          devices[rank].local_hardware_id, int(num_bytes), rank, num_ranks)
      buffers.local_ranks.append(rank)
    # Collective: every process reaches it, with or without local ranks.
    handles = _all_handles(created, num_ranks, process_of_rank)
    ordinals = [d.local_hardware_id if d.process_index == me else -1
                for d in devices]
    for rank in local_ranks:
      module.peer_buffers_open(devices[rank].local_hardware_id, handles,
                               process_of_rank, ordinals, me)
  except BaseException:
    buffers.close()
    raise
  atexit.register(buffers.close)
  return buffers
