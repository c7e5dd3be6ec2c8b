"""jax_ep: expert-parallel dispatch and combine for Mixture-of-Experts in JAX.

Every op runs inside `jax.shard_map` over the EP mesh axis of a `Buffer`.
"""

from jax_ep._src.config import Config as Config
from jax_ep._src.fp8 import per_token_cast_back as per_token_cast_back
from jax_ep._src.fp8 import per_token_cast_to_fp8 as per_token_cast_to_fp8
from jax_ep._src.handles import Dispatched as Dispatched
from jax_ep._src.handles import DispatchHandle as DispatchHandle
from jax_ep._src.handles import Layout as Layout
from jax_ep._src.handles import LowLatencyDispatched as LowLatencyDispatched
from jax_ep._src.handles import LowLatencyHandle as LowLatencyHandle
from jax_ep._src.layout import get_dispatch_layout as get_dispatch_layout
from jax_ep._src.low_latency import RecvHook as RecvHook
from jax_ep._src.low_latency import low_latency_combine as low_latency_combine
from jax_ep._src.low_latency import low_latency_dispatch as low_latency_dispatch
from jax_ep._src.normal import check_capacity as check_capacity
from jax_ep._src.normal import combine as combine
from jax_ep._src.normal import dispatch as dispatch
from jax_ep._src.overlap import overlap as overlap
from jax_ep._src.runtime import Buffer as Buffer
from jax_ep._src.runtime import Fallback as Fallback
from jax_ep._src.runtime import FallbackWarning as FallbackWarning
from jax_ep._src.runtime import Topology as Topology
from jax_ep._src.sizes import buffer_sizes as buffer_sizes
from jax_ep._src.sizes import ll_buffer_bytes as ll_buffer_bytes
from jax_ep._src.sizes import rdma_buffer_bytes as rdma_buffer_bytes
from jax_ep._src.sizes import nvl_buffer_bytes as nvl_buffer_bytes

__version__ = "0.1.0"
