"""DeepSeek-V3's gate of the MoE example (examples/moe/dsv3_gate.py) against a
straightforward NumPy walk of the published gating: random scores, exact
ties (the lower index wins, groups and experts), and the selection bias."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_paths import REPO

EXAMPLE = REPO / "examples" / "moe"
if str(EXAMPLE) not in sys.path:
  sys.path.insert(0, str(EXAMPLE))
import dsv3_gate  # noqa: E402  (examples/moe/dsv3_gate.py)


def numpy_gate(scores: np.ndarray, bias: np.ndarray, cfg):
  """The gating token by token: sorts with the lower index first on ties."""
  num_tokens = scores.shape[0]
  per_group = cfg.num_experts // cfg.num_groups
  idx = np.zeros((num_tokens, cfg.topk), np.int64)
  weights = np.zeros((num_tokens, cfg.topk), np.float32)
  for t in range(num_tokens):
    choice = (scores[t] + bias).astype(np.float32)
    groups = choice.reshape(cfg.num_groups, per_group)
    group_score = [np.sort(g)[::-1][:2].sum(dtype=np.float32) for g in groups]
    kept = np.argsort(-np.asarray(group_score), kind="stable")[:cfg.topk_groups]
    allowed = [e for e in range(cfg.num_experts) if e // per_group in kept]
    order = sorted(allowed, key=lambda e: (-choice[e], e))
    idx[t] = order[:cfg.topk]
    w = scores[t, idx[t]]
    weights[t] = w / w.sum(dtype=np.float32) * np.float32(cfg.route_scale)
  return idx, weights


def _scores_and_gate(x, bias, cfg):
  """The gate on logits x (an identity projection), and its scores."""
  eye = jnp.eye(cfg.num_experts, dtype=jnp.float32)
  idx, w = jax.jit(dsv3_gate.gate, static_argnums=3)(x, eye, bias, cfg)
  return np.asarray(jax.nn.sigmoid(x)), np.asarray(idx), np.asarray(w)


@pytest.mark.parametrize("cfg", [
    dsv3_gate.GateConfig(),  # DeepSeek-V3's: 256 experts, 8 groups, top-4, top-8
    dsv3_gate.GateConfig(num_experts=16, topk=3, num_groups=4, topk_groups=2),
    dsv3_gate.GateConfig(num_experts=12, topk=2, num_groups=1, topk_groups=1,
                         route_scale=1.0)], ids=["dsv3", "small", "no_groups"])
def test_gate_matches_numpy(rng, cfg):
  x = rng.normal(size=(64, cfg.num_experts)).astype(np.float32)
  bias = (rng.normal(size=cfg.num_experts) * 0.1).astype(np.float32)
  scores, idx, w = _scores_and_gate(x, bias, cfg)
  want_idx, want_w = numpy_gate(scores, bias, cfg)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(w, want_w, rtol=2e-6)


def test_ties_go_to_the_lower_index():
  """Equal logits everywhere: the first groups, then the first experts in
  them; one group made better by its two best experts wins first."""
  cfg = dsv3_gate.GateConfig(num_experts=16, topk=3, num_groups=4,
                             topk_groups=2)
  x = np.zeros((2, 16), np.float32)
  x[1, 12:14] = 1.0  # group 3 scores highest on token 1
  scores, idx, w = _scores_and_gate(x, np.zeros(16, np.float32), cfg)
  want_idx, _ = numpy_gate(scores, np.zeros(16, np.float32), cfg)
  np.testing.assert_array_equal(idx, want_idx)
  assert idx[0].tolist() == [0, 1, 2]
  assert idx[1].tolist() == [12, 13, 0]
  np.testing.assert_allclose(w.sum(-1), cfg.route_scale, rtol=1e-6)


def test_the_bias_picks_but_does_not_weigh(rng):
  """A large bias on one expert makes every token choose it; its weight is
  still its unbiased affinity's share."""
  cfg = dsv3_gate.GateConfig(num_experts=16, topk=2, num_groups=4,
                             topk_groups=2)
  x = rng.normal(size=(32, 16)).astype(np.float32)
  bias = np.zeros(16, np.float32)
  bias[5] = 10.0
  scores, idx, w = _scores_and_gate(x, bias, cfg)
  assert (idx[:, 0] == 5).all()
  want = scores[:, 5] / (scores[:, 5] + scores[np.arange(32), idx[:, 1]])
  np.testing.assert_allclose(w[:, 0], want * cfg.route_scale, rtol=2e-6)


def test_weights_are_differentiable_and_the_bias_is_not(rng):
  cfg = dsv3_gate.GateConfig(num_experts=16, topk=2, num_groups=4,
                             topk_groups=2)
  x = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=16), jnp.float32)
  loss = lambda weight, bias: (dsv3_gate.gate(x, weight, bias, cfg)[1] *
                               jnp.arange(2.0)).sum()
  d_weight, d_bias = jax.grad(loss, argnums=(0, 1))(weight, bias)
  assert np.abs(np.asarray(d_weight)).sum() > 0
  assert not np.asarray(d_bias).any()


def test_update_bias_moves_towards_the_mean_load():
  load = jnp.asarray([4, 1, 2, 1], jnp.int32)  # mean 2
  new = dsv3_gate.update_bias(jnp.zeros(4), load, 0.001)
  np.testing.assert_allclose(np.asarray(new), [-0.001, 0.001, 0.0, 0.001])
  idx = jnp.asarray([[0, 1], [0, 3]], jnp.int32)
  np.testing.assert_array_equal(
      np.asarray(dsv3_gate.expert_load(idx, 4)), [2, 1, 0, 1])


def test_config_refuses_impossible_sizes():
  with pytest.raises(ValueError, match="multiple of num_groups"):
    dsv3_gate.GateConfig(num_experts=10, num_groups=4)
  with pytest.raises(ValueError, match="topk_groups must be in"):
    dsv3_gate.GateConfig(topk_groups=9)
  with pytest.raises(ValueError, match="topk must be in"):
    dsv3_gate.GateConfig(num_experts=16, topk=9, num_groups=4, topk_groups=2)
