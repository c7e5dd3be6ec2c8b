"""Marks values that must not be differentiated through."""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def no_gradient(x, reason: str):
  """Identity on `x`; raises `TypeError(reason)` if a gradient flows into it.

  The backward rule only runs when `x` depends on what is differentiated, so
  values that are not differentiated pass freely.
  """
  del reason
  return x


def _fwd(x, reason):
  del reason
  return x, None


def _bwd(reason, residual, g):
  del residual, g
  raise TypeError(reason)


no_gradient.defvjp(_fwd, _bwd)
