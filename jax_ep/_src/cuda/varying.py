"""What the kernels' custom calls return, typed for shard_map."""

from __future__ import annotations

import jax


def mark_varying(axis_name: str, outputs):
  """Marks the kernels' results as varying over the EP axis (they differ per
  rank): shard_map's type checks, e.g. of a custom VJP's cotangents, expect
  what the reference's collectives produce. Unchanged outside shard_map."""
  def mark(a):
    if a is None or axis_name in jax.typeof(a).manual_axis_type.varying:
      return a
    try:
      return jax.lax.pcast(a, axis_name, to="varying")
    except NameError:  # the axis is not bound: not inside shard_map
      return a
  return jax.tree.map(mark, outputs)
