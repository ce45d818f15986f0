"""Routers: from token representations to a routing decision, plus their losses.

A router maps a group of tokens `<float>[groups, group_size, embed]` to a
decision about which expert processes which token, with what weight. Two kinds
of decision exist:

* `TokenChoiceDecision` (tokens choose their top-k experts): Switch top-1,
  ST-MoE top-2 and GShard top-2. Each (token, choice) assignment carries its
  *priority*: its rank among the assignments to the same expert. A capacity
  dispatcher keeps assignments with priority < capacity; a dropless one keeps
  all of them.
* `ExpertChoiceDecision` (experts choose their top-C tokens): Expert Choice.

Router math is always float32 ("selective precision", Switch Transformer
section 2.4), whatever the model's activation dtype. Logits come from a
bias-free dense layer `w` `[embed, experts]`.

Losses (scalars, in the decision; the MoE layer sows them):
* load-balancing loss `E^2 * mean_{g,e}(f[g,e] * P[g,e])`, where `f` is the
  fraction of a group's tokens that selected expert `e` among their top-k
  (before capacity) and `P` the mean router probability of `e`. As in the
  reference (flaxformer / Switch eq. 4-6), `sum_e f = k`, so a perfectly
  balanced top-2 router scores ~2 and a top-1 router ~1.
* router z-loss `mean(logsumexp(logits)^2)` (ST-MoE, arXiv:2202.08906).
"""

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax import types

SECOND_EXPERT_POLICIES = ("all", "threshold", "random")


@flax.struct.dataclass
class TokenChoiceDecision:
  """Which experts each token chose.

  Attributes:
    expert_index: <int32>[groups, group_size, k] chosen experts, best first.
    combine_weights: <float32>[groups, group_size, k] weight of each choice in
      the output (0 for invalid choices).
    priority: <int32>[groups, group_size, k] rank of each valid assignment
      among all valid assignments to the same expert in its group (0 = served
      first). Meaningless where `valid` is False.
    valid: <bool>[groups, group_size, k] the assignment exists (the token is
      not padding and, for GShard, the second expert was not dropped by the
      second-expert policy).
    router_probs: <float32>[groups, group_size, experts] softmax probabilities.
    token_mask: <bool>[groups, group_size] tokens that took part in routing.
    auxiliary_loss: load-balancing loss.
    router_z_loss: router z-loss.
  """

  expert_index: types.Array
  combine_weights: types.Array
  priority: types.Array
  valid: types.Array
  router_probs: types.Array
  token_mask: types.Array
  auxiliary_loss: types.Array
  router_z_loss: types.Array


@flax.struct.dataclass
class ExpertChoiceDecision:
  """Which tokens each expert chose.

  Attributes:
    token_index: <int32>[groups, experts, capacity] chosen tokens of each
      expert, by decreasing router probability.
    combine_weights: <float32>[groups, experts, capacity] router probability of
      each chosen token (0 where invalid).
    valid: <bool>[groups, experts, capacity] False where the chosen token is
      padding.
    router_probs: <float32>[groups, group_size, experts].
    token_mask: <bool>[groups, group_size] tokens that took part in routing.
    auxiliary_loss: always 0 (Expert Choice is balanced by construction).
    router_z_loss: router z-loss.
  """

  token_index: types.Array
  combine_weights: types.Array
  valid: types.Array
  router_probs: types.Array
  token_mask: types.Array
  auxiliary_loss: types.Array
  router_z_loss: types.Array


class Router(nn.Module):
  """Shared router machinery: float32 logits, jitter, padding, z-loss.

  Attributes:
    jitter_noise: multiplicative noise `Uniform(1 - eps, 1 + eps)` on router
      inputs during training (drawn from the 'jitter' rng stream); 0 disables.
    ignore_padding_tokens: exclude padding tokens (given by the caller's mask,
      or detected as all-zero vectors when no mask is given) from routing and
      from the losses.
    kernel_init: initializer of the router weights; normal(0.02) as in the
      reference, which found it slightly better than Switch's scaled init.
  """

  jitter_noise: float = 0.0
  ignore_padding_tokens: bool = False
  kernel_init: types.Initializer = nn.initializers.normal(stddev=2e-2)

  def validate(self, num_experts: int) -> None:
    """Raises ValueError for settings that cannot route `num_experts` experts."""
    del num_experts
    if not 0.0 <= self.jitter_noise < 1.0:
      raise ValueError(
          f"jitter_noise must be in [0, 1), got {self.jitter_noise}.")

  def router_logits(self, inputs: types.Array, num_experts: int, *,
                    enable_dropout: bool) -> types.Array:
    """<float32>[groups, group_size, experts] logits of `inputs`."""
    x = inputs.astype(jnp.float32)
    if enable_dropout and self.jitter_noise > 0:
      x = x * jax.random.uniform(
          self.make_rng("jitter"), x.shape, jnp.float32,
          minval=1.0 - self.jitter_noise, maxval=1.0 + self.jitter_noise)
    w = partitioning.param_with_axes(
        "w", self.kernel_init, (x.shape[-1], num_experts), jnp.float32,
        axes=("embed", "unmodeled"))
    # [groups, group_size, embed] x [embed, experts] -> [groups, group_size, experts]
    logits = jnp.einsum("gsm,me->gse", x, w,
                        precision=jax.lax.Precision.HIGHEST)
    return partitioning.with_sharding_constraint(
        logits, ("batch", "length", "unmodeled"))

  def token_mask(self, inputs: types.Array,
                 padding_mask: Optional[types.Array],
                 group_padding: types.Array) -> types.Array:
    """<bool>[groups, group_size]: tokens that take part in routing.

    Tokens the MoE layer added to fill groups are never routed; caller
    padding is excluded only when `ignore_padding_tokens` is set.
    """
    mask = ~group_padding
    if self.ignore_padding_tokens:
      if padding_mask is None:
        padding_mask = jnp.sum(jnp.abs(inputs), axis=-1) > 0
      mask = mask & padding_mask
    return mask

  def probabilities(self, inputs: types.Array, num_experts: int,
                    group_padding: types.Array, padding_mask: Optional[types.Array], *,
                    enable_dropout: bool):
    """(logits, softmax probabilities, routed-token mask) of `inputs`."""
    logits = self.router_logits(inputs, num_experts, enable_dropout=enable_dropout)
    return (logits, jax.nn.softmax(logits, axis=-1),
            self.token_mask(inputs, padding_mask, group_padding))


def router_z_loss(logits: types.Array, token_mask: types.Array) -> types.Array:
  """Mean of logsumexp(logits)^2 over routed tokens (ST-MoE eq. 5)."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  return _masked_mean(jnp.square(lse), token_mask)


def load_balancing_loss(router_probs: types.Array, expert_index: types.Array,
                        valid: types.Array, token_mask: types.Array) -> types.Array:
  """E^2 * mean over groups and experts of f * P (Switch eq. 4-6).

  Args:
    router_probs: <float32>[groups, group_size, experts].
    expert_index: <int32>[groups, group_size, k] top-k choices.
    valid: <bool>[groups, group_size, k] choices that count (padding excluded).
    token_mask: <bool>[groups, group_size] tokens that count.

  Returns:
    The scalar loss; a balanced top-k router scores about k.
  """
  num_experts = router_probs.shape[-1]
  # [groups, group_size, k, experts] -> [groups, group_size, experts]
  selected = jnp.max(
      jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
      * valid[..., None], axis=-2)
  count = jnp.maximum(jnp.sum(token_mask, axis=-1, keepdims=True), 1)
  # [groups, experts]
  fraction_selected = jnp.sum(selected, axis=1) / count
  mean_prob = jnp.sum(router_probs * token_mask[..., None], axis=1) / count
  return jnp.mean(fraction_selected * mean_prob) * num_experts**2


def assignment_priority(expert_index: types.Array, valid: types.Array,
                        num_experts: int,
                        token_order: Optional[types.Array] = None) -> types.Array:
  """Rank of each (token, choice) among the assignments to its expert.

  All first choices are ranked before any second choice (and so on), which is
  what lets the top-1 choices of every token take capacity first. Within one
  choice level, tokens are ranked in `token_order` (default: position order).

  Args:
    expert_index: <int32>[groups, group_size, k].
    valid: <bool>[groups, group_size, k]; invalid assignments take no rank.
    num_experts: number of experts.
    token_order: optional <int32>[groups, group_size] permutation: the i-th
      token served is `token_order[:, i]` (batch-prioritized routing).

  Returns:
    <int32>[groups, group_size, k] priorities.
  """
  one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
  one_hot = one_hot * valid[..., None]  # [groups, group_size, k, experts]
  if token_order is not None:
    one_hot = jnp.take_along_axis(one_hot, token_order[:, :, None, None], axis=1)
  groups, group_size, k, _ = one_hot.shape
  # Choice-major order: [groups, k, group_size, experts] -> [groups, k*group_size, experts]
  choice_major = jnp.swapaxes(one_hot, 1, 2).reshape(groups, k * group_size, num_experts)
  rank = jnp.cumsum(choice_major, axis=1) - 1
  rank = jnp.sum(rank * choice_major, axis=-1)  # [groups, k*group_size]
  rank = jnp.swapaxes(rank.reshape(groups, k, group_size), 1, 2)
  if token_order is not None:
    inverse = jnp.argsort(token_order, axis=-1)
    rank = jnp.take_along_axis(rank, inverse[:, :, None], axis=1)
  return rank


class TokensChooseRouter(Router):
  """Each token picks its top-k experts: Switch (k=1) and ST-MoE top-2.

  Combine weights are the raw router probabilities of the chosen experts (no
  renormalization over the top-k), as in the reference implementation.
  Capacity goes to every token's first choice before any second choice.

  Switch Transformer: https://arxiv.org/abs/2101.03961
  ST-MoE: https://arxiv.org/abs/2202.08906

  Attributes:
    num_selected_experts: k, experts per token.
    batch_prioritized_routing: serve tokens in order of decreasing top-1
      router probability instead of position order (V-MoE,
      https://arxiv.org/abs/2106.05974). Encoder only: in a decoder it lets
      later tokens displace earlier ones.
  """

  num_selected_experts: int = 1
  batch_prioritized_routing: bool = False

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if self.num_selected_experts < 1:
      raise ValueError(
          f"num_selected_experts must be >= 1, got {self.num_selected_experts}.")
    if self.num_selected_experts > num_experts:
      raise ValueError(
          f"A router selecting k={self.num_selected_experts} experts per token "
          f"needs at least k experts, but the layer has num_experts={num_experts}.")

  @nn.compact
  def __call__(self, inputs: types.Array, *, num_experts: int,
               expert_capacity: int, group_padding: types.Array,
               padding_mask: Optional[types.Array] = None,
               enable_dropout: bool = False) -> TokenChoiceDecision:
    """Routes `inputs` <float>[groups, group_size, embed]."""
    del expert_capacity  # Token choice ranks assignments; dispatch applies capacity.
    self.validate(num_experts)
    logits, probs, token_mask = self.probabilities(
        inputs, num_experts, group_padding, padding_mask, enable_dropout=enable_dropout)
    gates, expert_index = jax.lax.top_k(probs, self.num_selected_experts)
    valid = jnp.broadcast_to(token_mask[..., None], gates.shape)
    return self._decide(logits, probs, token_mask, expert_index,
                        gates * valid, valid)

  def _decide(self, logits, probs, token_mask, expert_index, combine_weights,
              valid) -> TokenChoiceDecision:
    num_experts = probs.shape[-1]
    token_order = None
    if self.batch_prioritized_routing:
      # Most confident tokens first; stable so ties keep position order.
      token_order = jnp.argsort(-probs.max(axis=-1), axis=-1, stable=True)
    return TokenChoiceDecision(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=combine_weights.astype(jnp.float32),
        priority=assignment_priority(expert_index, valid, num_experts, token_order),
        valid=valid,
        router_probs=probs,
        token_mask=token_mask,
        auxiliary_loss=load_balancing_loss(
            probs, expert_index, jnp.broadcast_to(token_mask[..., None], valid.shape),
            token_mask),
        router_z_loss=router_z_loss(logits, token_mask),
    )


class GShardTop2Router(TokensChooseRouter):
  """GShard top-2 gating with Mesh-TensorFlow semantics.

  The two gates are renormalized to sum to 1; the first expert is always
  used, the second according to a policy:
    * 'all': always;
    * 'threshold': only if its normalized gate exceeds `second_expert_threshold`;
    * 'random': with probability min(1, g2 / second_expert_threshold), drawn
      from the 'gating' rng stream (GShard's random routing).
  Capacity goes to all first choices before any second choice.

  GShard: https://arxiv.org/abs/2006.16668

  Attributes:
    second_expert_policy: policy while training.
    eval_second_expert_policy: policy at evaluation (no rng needed for 'all'
      and 'threshold').
    second_expert_threshold: the threshold of both 'threshold' and 'random'.
  """

  num_selected_experts: int = 2
  second_expert_policy: str = "random"
  eval_second_expert_policy: str = "all"
  second_expert_threshold: float = 0.2

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if self.num_selected_experts != 2:
      raise ValueError(
          "GShardTop2Router always selects 2 experts; for other k use "
          f"TokensChooseRouter(num_selected_experts={self.num_selected_experts}).")
    for policy in (self.second_expert_policy, self.eval_second_expert_policy):
      if policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"Unknown second_expert_policy {policy!r}; choose one of "
            f"{SECOND_EXPERT_POLICIES}.")
    if self.second_expert_threshold <= 0:
      raise ValueError("second_expert_threshold must be > 0, got "
                       f"{self.second_expert_threshold}.")

  @nn.compact
  def __call__(self, inputs: types.Array, *, num_experts: int,
               expert_capacity: int, group_padding: types.Array,
               padding_mask: Optional[types.Array] = None,
               enable_dropout: bool = False) -> TokenChoiceDecision:
    del expert_capacity
    self.validate(num_experts)
    logits, probs, token_mask = self.probabilities(
        inputs, num_experts, group_padding, padding_mask, enable_dropout=enable_dropout)
    gates, expert_index = jax.lax.top_k(probs, 2)
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-9)
    policy = self.second_expert_policy if enable_dropout else self.eval_second_expert_policy
    second_gate = gates[..., 1]
    if policy == "all":
      keep_second = jnp.ones_like(token_mask)
    elif policy == "threshold":
      keep_second = second_gate > self.second_expert_threshold
    else:
      draw = jax.random.uniform(self.make_rng("gating"), second_gate.shape)
      keep_second = draw < second_gate / self.second_expert_threshold
    valid = jnp.stack([token_mask, token_mask & keep_second], axis=-1)
    return self._decide(logits, probs, token_mask, expert_index, gates * valid, valid)


class ExpertChoiceRouter(Router):
  """Each expert picks its top-C tokens of the group (Expert Choice).

  Balanced by construction, so no load-balancing loss (it is reported as 0);
  a token may be processed by zero or several experts. Must not be used in a
  decoder: an expert's choice depends on later tokens.

  Expert Choice: https://arxiv.org/abs/2202.09368
  """

  @nn.compact
  def __call__(self, inputs: types.Array, *, num_experts: int,
               expert_capacity: int, group_padding: types.Array,
               padding_mask: Optional[types.Array] = None,
               enable_dropout: bool = False) -> ExpertChoiceDecision:
    self.validate(num_experts)
    group_size = inputs.shape[1]
    if expert_capacity > group_size:
      raise ValueError(
          f"Expert choice capacity {expert_capacity} exceeds the group size "
          f"{group_size}; lower the capacity factor or raise max_group_size.")
    logits, probs, token_mask = self.probabilities(
        inputs, num_experts, group_padding, padding_mask, enable_dropout=enable_dropout)
    # Padding ranks below every real token (probabilities are >= 0).
    scores = jnp.where(token_mask[..., None], probs, -1.0)
    # [groups, group_size, experts] -> [groups, experts, group_size]
    gates, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), expert_capacity)
    valid = gates >= 0
    return ExpertChoiceDecision(
        token_index=token_index.astype(jnp.int32),
        combine_weights=jnp.where(valid, gates, 0.0).astype(jnp.float32),
        valid=valid,
        router_probs=probs,
        token_mask=token_mask,
        auxiliary_loss=jnp.zeros((), jnp.float32),
        router_z_loss=router_z_loss(logits, token_mask),
    )


def _masked_mean(values: types.Array, mask: types.Array) -> types.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)
