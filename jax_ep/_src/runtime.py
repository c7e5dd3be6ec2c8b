"""The process-level runtime object: EP mesh axis, topology, config, backend.

A `Buffer` is created once per process, collectively (every process of the
mesh creates it with the same arguments), before the ops are traced. It is
what every op takes first: it tells the op which mesh axis is the EP axis, how
many ranks there are, how they are grouped into nodes, and which backend of
the op's family runs it (`backend.py`). On the "cuda" backend it opens the
kernels' backends, which own the NVLink peer buffers (one set per EP group)
and the NVSHMEM heap (docs/processes.md).
"""

from __future__ import annotations

import dataclasses
import socket
import warnings
from typing import Literal

import jax
import numpy as np
from jax import lax

from jax_ep._src import exchange
from jax_ep._src import native
from jax_ep._src import overlap
from jax_ep._src.backend import LayoutBackend, LowLatencyBackend, NormalBackend
from jax_ep._src.config import OVERLAP_NUM_SMS, Config, tuned_config
from jax_ep._src.cuda import layout as cuda_layout
from jax_ep._src.cuda import nvshmem
from jax_ep._src.cuda.internode import CudaInternode
from jax_ep._src.cuda.intranode import CudaIntranode
from jax_ep._src.cuda.low_latency import CudaLowLatency
from jax_ep._src.reference import layout as reference_layout
from jax_ep._src.reference.low_latency import ReferenceLowLatency
from jax_ep._src.reference.normal import ReferenceNormal

Backend = Literal["auto", "cuda", "reference"]
_BACKENDS = ("auto", "cuda", "reference")
_NODE_SIZES = (1, 2, 4, 8)
# Ops with a CUDA kernel (every public op).
KERNEL_OPS = frozenset({"get_dispatch_layout", "dispatch", "combine",
                        "low_latency_dispatch", "low_latency_combine"})
# Ops that need the NVLink peer buffers (num_nvl_bytes) on one node, or the
# NVSHMEM exchange region (num_rdma_bytes) across nodes, on the "cuda" backend.
NVL_OPS = frozenset({"dispatch", "combine"})
# Ops that need the NVSHMEM heap (num_ll_bytes) on the "cuda" backend.
LL_OPS = frozenset({"low_latency_dispatch", "low_latency_combine"})
_LL_TRANSPORTS = ("auto", "put")
DEFAULT_TIMEOUT_S = 100.0


class FallbackWarning(UserWarning):
  """An op of a Buffer on the "cuda" backend ran the pure-JAX reference
  instead of a kernel (once per op and reason; `Buffer.fallbacks()` lists
  them all)."""


@dataclasses.dataclass(frozen=True)
class Fallback:
  """One reason why `op` ran the pure-JAX reference on the "cuda" backend."""

  op: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where the EP ranks live.

  Attributes:
    num_ranks: size of the EP mesh axis (R).
    ranks_per_node: ranks that share a host and talk over NVLink (G).
    num_nodes: R // G.
    process_of_rank: the JAX process index driving each rank.
  """

  num_ranks: int
  ranks_per_node: int
  num_nodes: int
  process_of_rank: tuple[int, ...]

  @property
  def one_process_per_rank(self) -> bool:
    """True when each rank has its own process (what NVSHMEM paths need)."""
    return len(set(self.process_of_rank)) == self.num_ranks


def _host_names() -> list[bytes]:
  """Each JAX process's host name, in process order (collective)."""
  return exchange.allgather("host names", socket.gethostname().encode())


def _ep_groups(mesh: jax.sharding.Mesh, axis_name: str) -> list[list]:
  """Every EP group's devices in rank order (one group per other-axis index)."""
  axis = mesh.axis_names.index(axis_name)
  rows = np.moveaxis(mesh.devices, axis, -1).reshape(
      -1, mesh.devices.shape[axis])
  return [list(row) for row in rows]


def _ep_devices(mesh: jax.sharding.Mesh, axis_name: str) -> list[jax.Device]:
  """Devices of the EP ranks, in rank order, of the first EP group."""
  return _ep_groups(mesh, axis_name)[0]


def _topology(mesh, axis_name, ranks_per_node) -> Topology:
  devices = _ep_devices(mesh, axis_name)
  num_ranks = len(devices)
  process_of_rank = tuple(d.process_index for d in devices)
  if ranks_per_node is None:
    hosts = _host_names()
    node_of_rank = [hosts[p] for p in process_of_rank]
    sizes = {node_of_rank.count(h) for h in set(node_of_rank)}
    if len(sizes) != 1:
      raise ValueError(
          "jax_ep.Buffer: the EP ranks are spread unevenly over hosts "
          f"({sorted(sizes)} ranks per host); pass ranks_per_node explicitly")
    ranks_per_node = sizes.pop()
  if (not isinstance(ranks_per_node, int) or ranks_per_node < 1
      or num_ranks % ranks_per_node):
    raise ValueError(
        "jax_ep.Buffer: ranks_per_node must be a positive divisor of the EP "
        f"size {num_ranks}, got {ranks_per_node!r}")
  if ranks_per_node < num_ranks and ranks_per_node not in _NODE_SIZES:
    raise ValueError(
        f"jax_ep.Buffer: ranks_per_node must be one of {_NODE_SIZES} when the "
        f"EP axis spans several nodes, got {ranks_per_node}")
  return Topology(num_ranks, ranks_per_node, num_ranks // ranks_per_node,
                  process_of_rank)


def _internode_fallback(topology: Topology) -> str | None:
  """Why the normal ops across nodes run the reference on the cuda backend,
  or None when the internode kernels serve `topology` (docs/internode.md)."""
  if not topology.one_process_per_rank:
    return ("the EP axis spans several nodes, and the internode kernels "
            "(NVSHMEM) need one process per rank")
  return None


def _resolve_backend(backend: str, devices: list[jax.Device]) -> str:
  if backend not in _BACKENDS:
    raise ValueError(
        f"jax_ep.Buffer: backend must be one of {_BACKENDS}, got {backend!r}")
  platforms = {d.platform for d in devices}
  on_gpus = platforms == {"gpu"}
  if backend == "reference":
    return backend
  if backend == "auto":
    return "cuda" if on_gpus and native.extension() is not None else "reference"
  if not on_gpus:
    raise RuntimeError(
        "jax_ep.Buffer: backend='cuda' needs the EP mesh axis on CUDA GPUs, "
        f"but its devices are on {sorted(platforms)}; use backend='reference' "
        "or 'auto'")
  if native.extension() is None:
    raise RuntimeError(
        "jax_ep.Buffer: backend='cuda' needs the compiled extension "
        f"jax_ep._jax_ep: {native.unavailable_reason()}. Reinstall with nvcc "
        "on PATH (see README, 'Build'), or use backend='reference' or 'auto'")
  return backend


def sm_count(devices) -> int | None:
  """The fewest SMs of `devices`; None when none says its SM count."""
  counts = [d.core_count for d in devices if getattr(d, "core_count", None)]
  return min(counts) if counts else None


def check_sms(config: Config, devices) -> None:
  """Refuses a `config.num_sms` above the SM count of `devices` (the kernels
  keep one block per SM resident), at Buffer creation rather than at the
  first call. Devices that do not say their SM count are not checked."""
  sms = sm_count(devices)
  if sms and config.num_sms > sms:  # 0, automatic, fits anything
    raise ValueError(
        f"jax_ep.Buffer: config.num_sms is {config.num_sms} but the GPUs have "
        f"{sms} SMs; the kernels keep one block per SM resident, so "
        f"num_sms must be <= {sms}")


class Buffer:
  """Runtime for expert-parallel communication over one mesh axis.

  Create it once per process, on every process, with the same arguments, then
  pass it to the ops, which must run inside `jax.shard_map` over `axis_name`.

  Args:
    mesh: the device mesh the ops run under.
    axis_name: the mesh axis that holds the expert-parallel ranks.
    backend: "reference" runs the pure-JAX implementation (any platform);
      "cuda" runs the CUDA kernels and fails if the extension is not built or
      the mesh is not on GPUs; "auto" picks "cuda" when both hold.
    config: SM budget and chunking (`Config`). Default: the entry that
      `python -m jax_ep.tune` wrote for this device kind and EP size (file
      `$JAX_EP_CONFIG`, else ~/.cache/jax_ep/config.json), else `Config()`.
    ranks_per_node: ranks per NVLink domain (G). Detected from the hosts of
      the processes by default; set it to simulate several nodes on one host.
    num_nvl_bytes: size of each rank's NVLink buffer for the intranode
      dispatch and combine kernels; `jax_ep.nvl_buffer_bytes(...)` computes it
      from the largest shapes you will run. Needed on the "cuda" backend when
      the EP axis is on one host; ignored by the reference backend. Allocated
      here, collectively, outside JAX's memory pool: leave room with
      `XLA_PYTHON_CLIENT_MEM_FRACTION` (the error says so when it lacks).
    num_ll_bytes: size of the NVSHMEM symmetric heap of the low-latency
      kernels; `jax_ep.ll_buffer_bytes(...)` computes it from the largest
      shapes you will run. Needed by the low-latency ops on the "cuda"
      backend, which run one process per GPU. Allocated here, collectively,
      outside JAX's memory pool (JAX's default 75% leaves room on 80 GB GPUs).
    num_rdma_bytes: size of the NVSHMEM region of the internode dispatch
      and combine; `jax_ep.rdma_buffer_bytes(...)` computes it from the
      largest shapes you will run (whole calls; less sends each call in
      pieces that fit). Needed by `dispatch` and `combine` on the
      "cuda" backend when the EP axis spans several nodes (one process per
      GPU; docs/internode.md). Allocated with num_ll_bytes in one NVSHMEM
      heap.
    rdma_qps_per_rank, rdma_service_level, rdma_traffic_class: NVSHMEM's
      RDMA settings for both NVSHMEM families (one NVSHMEM job per process):
      InfiniBand queue pairs per peer with IBGDA
      (`NVSHMEM_IBGDA_NUM_RC_PER_PE`), service level (`NVSHMEM_IB_SL`, 0-15)
      and traffic class (`NVSHMEM_IB_TRAFFIC_CLASS`, 0-255). None keeps
      NVSHMEM's default; a variable already in the environment wins. The
      fabric's adaptive routing is a property of a service level: pick one
      on which the switches enable it. Applied before NVSHMEM starts (the
      first Buffer with num_ll_bytes or num_rdma_bytes in the process).
    ll_transport: "auto" writes to peers that NVLink reaches with plain
      stores and uses NVSHMEM puts for the others; "put" uses puts for every
      peer (to test that path on one host).
    timeout_s: how long a kernel waits for a peer rank before it prints the
      rank and phase and fails (instead of hanging).
  """

  def __init__(self, mesh: jax.sharding.Mesh, axis_name: str = "ep", *,
               backend: Backend = "auto", config: Config | None = None,
               ranks_per_node: int | None = None,
               num_nvl_bytes: int | None = None,
               num_ll_bytes: int | None = None,
               num_rdma_bytes: int | None = None,
               rdma_qps_per_rank: int | None = None,
               rdma_service_level: int | None = None,
               rdma_traffic_class: int | None = None,
               ll_transport: str = "auto",
               timeout_s: float = DEFAULT_TIMEOUT_S):
    if axis_name not in mesh.axis_names:
      raise ValueError(
          f"jax_ep.Buffer: axis_name {axis_name!r} is not an axis of the mesh "
          f"(axes {mesh.axis_names})")
    if config is None:
      # The autotuner's entry for these GPUs and this EP size, if any.
      devices = _ep_devices(mesh, axis_name)
      config = tuned_config(devices[0].device_kind, len(devices)) or Config()
    if not isinstance(config, Config):
      raise TypeError(
          f"jax_ep.Buffer: config must be a jax_ep.Config, got {type(config)}")
    self.mesh = mesh
    self.axis_name = axis_name
    self.config = config
    self.topology = _topology(mesh, axis_name, ranks_per_node)
    self.backend = _resolve_backend(backend, _ep_devices(mesh, axis_name))
    self._fallbacks: dict[Fallback, None] = {}  # insertion-ordered set
    if not timeout_s > 0:
      raise ValueError(
          f"jax_ep.Buffer: timeout_s must be > 0, got {timeout_s!r}")
    for name, value in (("num_nvl_bytes", num_nvl_bytes),
                        ("num_ll_bytes", num_ll_bytes),
                        ("num_rdma_bytes", num_rdma_bytes)):
      if value is not None and (
          not isinstance(value, (int, np.integer)) or value < 0):
        raise ValueError(
            f"jax_ep.Buffer: {name} must be an int >= 0 (see "
            f"jax_ep.{name[4:-6]}_buffer_bytes), got {value!r}")
    rdma_env = nvshmem.rdma_environment(qps_per_rank=rdma_qps_per_rank,
                                        service_level=rdma_service_level,
                                        traffic_class=rdma_traffic_class)
    if ll_transport not in _LL_TRANSPORTS:
      raise ValueError(
          f"jax_ep.Buffer: ll_transport must be one of {_LL_TRANSPORTS}, got "
          f"{ll_transport!r}")
    self.num_nvl_bytes = num_nvl_bytes
    self.num_ll_bytes = num_ll_bytes
    self.num_rdma_bytes = num_rdma_bytes
    # Across nodes the reference sums combine's rows node by node.
    self._reference_normal = ReferenceNormal(axis_name,
                                             self.topology.ranks_per_node)
    self._reference_low_latency = ReferenceLowLatency(axis_name)
    self._intranode: CudaIntranode | None = None
    self._internode: CudaInternode | None = None
    self._low_latency: CudaLowLatency | None = None
    self._heap: nvshmem.NvshmemHeap | None = None
    if self.backend != "cuda":
      return
    topology = self.topology
    rdma_bytes = (int(num_rdma_bytes or 0) if topology.num_nodes > 1
                  and not _internode_fallback(topology) else 0)
    local_devices = [d for d in mesh.devices.flat
                     if d.process_index == jax.process_index()]
    self._sm_count = sm_count(local_devices)
    if (num_nvl_bytes and topology.num_nodes == 1) or rdma_bytes:
      check_sms(config, local_devices)
    if num_nvl_bytes and topology.num_nodes == 1:
      self._intranode = CudaIntranode.open(
          axis_name, _ep_groups(mesh, axis_name), int(num_nvl_bytes), config,
          timeout_s=float(timeout_s), fall_back=self.fall_back)
    if num_ll_bytes or rdma_bytes:
      groups = _ep_groups(mesh, axis_name)
      if len(groups) > 1:
        raise ValueError(
            "jax_ep.Buffer: the NVSHMEM kernels (num_ll_bytes, num_rdma_bytes) "
            f"support one EP group per job; the mesh has {len(groups)} along "
            "the other axes")
      self._heap = nvshmem.open_heap(groups[0], int(num_ll_bytes or 0),
                                     rdma_bytes, rdma_env)
    if num_ll_bytes:
      self._low_latency = CudaLowLatency(
          axis_name, self._heap, int(num_ll_bytes),
          force_put=ll_transport == "put", timeout_s=float(timeout_s))
    if rdma_bytes:
      self._internode = CudaInternode(axis_name, rdma_bytes,
                                      topology.ranks_per_node,
                                      float(timeout_s),
                                      rdma_chunk=config.rdma_chunk)

  @property
  def num_ranks(self) -> int:
    return self.topology.num_ranks

  def rank(self) -> jax.Array:
    """This shard's EP rank, an int32 scalar; only inside `shard_map`."""
    return lax.axis_index(self.axis_name)

  def check_call_site(self, op: str) -> None:
    """Fails clearly when `op` is traced outside `shard_map` over the axis,
    or inside `overlap`'s compute."""
    overlap.check_not_in_compute(op)
    try:
      size = lax.axis_size(self.axis_name)
    except NameError as e:
      raise ValueError(
          f"jax_ep.{op} must be called inside jax.shard_map over the EP axis "
          f"{self.axis_name!r}") from e
    if size != self.num_ranks:
      raise ValueError(
          f"jax_ep.{op}: axis {self.axis_name!r} has size {size} here but the "
          f"Buffer was built for {self.num_ranks} ranks")

  def _uses_kernel(self, op: str) -> bool:
    """Whether `op` runs a CUDA kernel; records a fallback when CUDA cannot.

    Raises:
      ValueError: `op` needs the NVLink buffers or the NVSHMEM heap and the
        Buffer has none.
    """
    if self.backend != "cuda":
      return False
    if op in NVL_OPS:
      topology = self.topology
      if topology.num_nodes > 1:
        reason = _internode_fallback(topology)
        if reason:
          self.fall_back(op, reason)
          return False
        if self._internode is None:
          raise ValueError(
              f"jax_ep.{op} on the cuda backend across nodes needs the "
              "NVSHMEM exchange region: create the Buffer with num_rdma_bytes="
              "jax_ep.rdma_buffer_bytes(num_tokens, hidden, topk, num_ranks, "
              "ranks_per_node) for the largest shapes you run")
      if topology.num_nodes == 1 and self._intranode is None:
        raise ValueError(
            f"jax_ep.{op} on the cuda backend needs the NVLink buffers: create "
            "the Buffer with num_nvl_bytes=jax_ep.nvl_buffer_bytes(num_tokens, "
            "hidden, topk, num_ranks) for the largest shapes you run")
    if op in LL_OPS and self._low_latency is None:
      raise ValueError(
          f"jax_ep.{op} on the cuda backend needs the NVSHMEM heap: create the "
          "Buffer with num_ll_bytes=jax_ep.ll_buffer_bytes(max_tokens, hidden, "
          "num_experts) for the largest shapes you run (one process per GPU)")
    return True

  def layout_backend(self, op: str, num_experts: int) -> LayoutBackend:
    """What runs `get_dispatch_layout` (`op`) for this Buffer and E: past the
    kernel's limits (the internode ops serve larger R) the reference, a
    listed fallback; the layout is a small part of a step."""
    if not self._uses_kernel(op):
      return reference_layout
    if not cuda_layout.takes(self.num_ranks, num_experts):
      most_ranks, most_experts = cuda_layout.limits()
      self.fall_back(op, f"the layout kernel takes num_ranks <= {most_ranks} "
                     f"and num_experts <= {most_experts}, got {self.num_ranks} "
                     f"and {num_experts}")
      return reference_layout
    return cuda_layout

  def num_sms(self, *, beside_compute: bool = False) -> int | None:
    """The SMs the normal kernels take (`Config.num_sms`, resolved when
    automatic) traced beside computation (inside `jax_ep.overlap`) or not;
    None on the "reference" backend."""
    if self.backend != "cuda":
      return None
    if self._intranode is None and self._internode is not None:
      # The exchange has only run with ranks sharing one GPU, where a grid
      # cannot be timed: its automatic grid stays the budget.
      return self.config.num_sms or OVERLAP_NUM_SMS
    return self.config.resolved_num_sms(beside_compute=beside_compute,
                                        sm_count=self._sm_count)

  def normal_backend(self, op: str) -> NormalBackend:
    """What runs the normal dispatch and combine for the public op `op`
    (its backward included)."""
    if self._uses_kernel(op):
      num_sms = self.num_sms(beside_compute=overlap.beside_compute())
      if self._intranode is not None:
        return dataclasses.replace(
            self._intranode, op=op,
            config=dataclasses.replace(self.config, num_sms=num_sms))
      return dataclasses.replace(self._internode, op=op, num_sms=num_sms)
    return self._reference_normal

  def low_latency_backend(self, op: str) -> LowLatencyBackend:
    """What runs the low-latency op `op` (its halves and its backward)."""
    if self._uses_kernel(op):
      return dataclasses.replace(self._low_latency, op=op)
    return self._reference_low_latency

  def fall_back(self, op: str, reason: str) -> None:
    """Records that `op`, traced now, runs the reference on the cuda backend;
    warns (`FallbackWarning`) the first time for each op and reason."""
    fallback = Fallback(op, reason)
    if fallback in self._fallbacks:
      return
    self._fallbacks[fallback] = None
    warnings.warn(f"jax_ep.{op} runs the pure-JAX reference on the GPUs, not "
                  f"a CUDA kernel: {reason}", FallbackWarning, stacklevel=4)

  def fallbacks(self) -> tuple[Fallback, ...]:
    """Every (op, reason) for which an op of this Buffer, on the "cuda"
    backend, has run the pure-JAX reference instead of a kernel, in the order
    they were first traced; empty on the "reference" backend, where nothing
    is a fallback. Ops are traced once per shape under `jit`, so ask after
    tracing (e.g. after the first call or `.lower()`)."""
    return tuple(self._fallbacks)

  def close(self) -> None:
    """Frees the NVSHMEM heap and the NVLink buffers, which every Buffer over
    the same EP groups shares (collective: once every op has finished on
    every rank); the NVLink buffers are also freed at interpreter exit.

    The heap goes first: its close waits for this GPU's work and for every
    rank, so no peer still writes into the NVLink buffers freed after it.
    """
    if self._heap is not None:
      self._heap.close()
    self._heap = self._low_latency = self._internode = None
    if self._intranode is not None:
      self._intranode.close()
    self._intranode = None

  def __repr__(self):
    t = self.topology
    return (f"Buffer(axis_name={self.axis_name!r}, num_ranks={t.num_ranks}, "
            f"ranks_per_node={t.ranks_per_node}, backend={self.backend!r}, "
            f"config={self.config})")
