"""The process-level runtime object: EP mesh axis, topology, config, backend.

A `Buffer` is created once per process, collectively (every process of the
mesh creates it with the same arguments), before the ops are traced. It is
what every op takes first: it tells the op which mesh axis is the EP axis, how
many ranks there are, how they are grouped into nodes, which backend runs and
with which `Config`. When the CUDA communication kernels land it will also own
their GPU buffers (DESIGN.md §3); today the only kernel is the layout kernel,
which needs none.
"""

from __future__ import annotations

import dataclasses
import socket
import warnings
import zlib
from typing import Literal

import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from jax_ep._src import native
from jax_ep._src.config import Config

Backend = Literal["auto", "cuda", "reference"]
_BACKENDS = ("auto", "cuda", "reference")
_NODE_SIZES = (1, 2, 4, 8)
# Ops with a CUDA kernel; on the "cuda" backend the others run the reference.
KERNEL_OPS = frozenset({"get_dispatch_layout"})


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


def _host_ids() -> np.ndarray:
  """One id per JAX process naming its host (collective across processes)."""
  own = np.int64(zlib.crc32(socket.gethostname().encode()))
  if jax.process_count() == 1:
    return np.array([own])
  return np.asarray(multihost_utils.process_allgather(own)).reshape(-1)


def _ep_devices(mesh: jax.sharding.Mesh, axis_name: str) -> list[jax.Device]:
  """Devices of the EP ranks, in rank order, along the first other-axis row."""
  axis = mesh.axis_names.index(axis_name)
  row = np.moveaxis(mesh.devices, axis, 0).reshape(mesh.devices.shape[axis], -1)
  return list(row[:, 0])


def _topology(mesh, axis_name, ranks_per_node) -> Topology:
  devices = _ep_devices(mesh, axis_name)
  num_ranks = len(devices)
  process_of_rank = tuple(d.process_index for d in devices)
  if ranks_per_node is None:
    hosts = _host_ids()
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
    config: SM budget and chunking (`Config`); defaults are tuned for 24 SMs.
    ranks_per_node: ranks per NVLink domain (G). Detected from the hosts of
      the processes by default; set it to simulate several nodes on one host.
  """

  def __init__(self, mesh: jax.sharding.Mesh, axis_name: str = "ep", *,
               backend: Backend = "auto", config: Config | None = None,
               ranks_per_node: int | None = None):
    if axis_name not in mesh.axis_names:
      raise ValueError(
          f"jax_ep.Buffer: axis_name {axis_name!r} is not an axis of the mesh "
          f"(axes {mesh.axis_names})")
    if config is None:
      config = Config()
    if not isinstance(config, Config):
      raise TypeError(
          f"jax_ep.Buffer: config must be a jax_ep.Config, got {type(config)}")
    self.mesh = mesh
    self.axis_name = axis_name
    self.config = config
    self.topology = _topology(mesh, axis_name, ranks_per_node)
    self.backend = _resolve_backend(backend, _ep_devices(mesh, axis_name))
    self._warned: set[str] = set()

  @property
  def num_ranks(self) -> int:
    return self.topology.num_ranks

  def rank(self) -> jax.Array:
    """This shard's EP rank, an int32 scalar; only inside `shard_map`."""
    return lax.axis_index(self.axis_name)

  def check_inside_shard_map(self, op: str) -> None:
    """Fails clearly when `op` is traced outside `shard_map` over the axis."""
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

  def uses_kernel(self, op: str) -> bool:
    """Whether `op` runs a CUDA kernel; warns once when CUDA must fall back."""
    if self.backend != "cuda":
      return False
    has_kernel = op in KERNEL_OPS
    if not has_kernel and op not in self._warned:
      self._warned.add(op)
      warnings.warn(
          f"jax_ep.{op} has no CUDA kernel yet; it runs the pure-JAX reference "
          "on the GPUs (see the README's status table)", stacklevel=3)
    return has_kernel

  def __repr__(self):
    t = self.topology
    return (f"Buffer(axis_name={self.axis_name!r}, num_ranks={t.num_ranks}, "
            f"ranks_per_node={t.ranks_per_node}, backend={self.backend!r}, "
            f"config={self.config})")
