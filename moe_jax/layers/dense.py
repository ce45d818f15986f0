"""Dense building blocks: token embedding, RMSNorm, and the (gated) MLP.

The MLP math lives in `mlp_forward`, a pure function shared by `MlpBlock`
(one FFN) and the MoE experts (a batch of FFNs with stacked weights), so a
dense model and an MoE model compute their feed-forward blocks identically.
"""

from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax import types

Activation = Union[str, Callable[[types.Array], types.Array]]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def resolve_activation(activation: Activation) -> Callable[[types.Array], types.Array]:
  """Returns the callable for an activation name ('gelu', 'relu', 'linear', ...)."""
  if callable(activation):
    return activation
  if activation == "linear":
    return lambda x: x
  if activation == "gelu":
    # T5.1.1 / Switch / HF `gelu_new` use the tanh approximation.
    return lambda x: jax.nn.gelu(x, approximate=True)
  if activation == "gelu_exact":
    return lambda x: jax.nn.gelu(x, approximate=False)
  fn = getattr(jax.nn, activation, None)
  if fn is None:
    raise ValueError(
        f"Unknown activation {activation!r}: use a jax.nn function name such as "
        "'gelu', 'relu', 'silu', or 'linear'.")
  return fn


Projection = Callable[[types.Array, types.Array], types.Array]


def dense_projection(x: types.Array, kernel: types.Array) -> types.Array:
  """`[..., in] @ [in, out] -> [..., out]`."""
  return jnp.einsum("...i,io->...o", x, kernel)


def mlp_forward(
    x: types.Array,
    wi: Sequence[types.Array],
    wo: types.Array,
    activations: Sequence[Activation],
    *,
    project: Projection = dense_projection,
    bi: Optional[Sequence[types.Array]] = None,
    bo: Optional[types.Array] = None,
    dropout: Optional[Callable[[types.Array], types.Array]] = None,
) -> types.Array:
  """(Gated) feed-forward block: prod_i act_i(x @ wi_i + bi_i) @ wo + bo.

  With activations ('gelu', 'linear') this is T5.1.1's gated GELU; with
  ('relu',) it is the original T5 FFN.

  Args:
    x: inputs, e.g. `[..., embed]`, or `[experts, tokens, embed]` for experts.
    wi: one input kernel per activation.
    wo: output kernel.
    activations: activation per input kernel; their outputs are multiplied.
    project: the matmul `(activations, kernel) -> activations`, used for the
      input and output projections (dense, batched per expert, grouped...).
    bi: optional biases added to each `project(x, wi_i)`.
    bo: optional bias added to the output.
    dropout: applied to the intermediate activations (expert dropout inside
      MoE experts, `intermediate_dropout_rate` in dense blocks).

  Returns:
    `project(hidden, wo)`: the block's output.
  """
  if len(wi) != len(activations):
    raise ValueError(
        f"Got {len(wi)} input kernels for {len(activations)} activations.")
  hidden = None
  for i, (kernel, activation) in enumerate(zip(wi, activations)):
    h = project(x, kernel)
    if bi is not None:
      h = h + bi[i]
    h = resolve_activation(activation)(h)
    hidden = h if hidden is None else hidden * h
  if dropout is not None:
    hidden = dropout(hidden)
  y = project(hidden, wo)
  if bo is not None:
    y = y + bo
  return y


class MlpBlock(nn.Module):
  """Transformer feed-forward block (T5 / T5.1.1 gated variants).

  Attributes:
    intermediate_dim: hidden width `d_ff`.
    activations: one activation per input projection; several are multiplied
      elementwise (('gelu', 'linear') = gated GELU, ('relu',) = T5 v1.0).
    kernel_init: initializer of both projections.
    use_bias: whether projections carry biases (T5 uses none).
    intermediate_dropout_rate: dropout on the hidden activations (train only).
    dtype: computation dtype; parameters stay float32.
    input_axis_name / intermediate_axis_name: logical axes of the kernels.
  """

  intermediate_dim: int = 2048
  activations: Sequence[Activation] = ("gelu", "linear")
  kernel_init: types.Initializer = default_kernel_init
  use_bias: bool = False
  intermediate_dropout_rate: float = 0.0
  dtype: types.DType = jnp.float32
  input_axis_name: str = "embed"
  intermediate_axis_name: str = "mlp"

  @nn.compact
  def __call__(self, inputs: types.Array, *, enable_dropout: bool = False) -> types.Array:
    """Applies the block to `inputs` `[..., embed]`."""
    features = inputs.shape[-1]
    in_axes = (self.input_axis_name, self.intermediate_axis_name)
    names = ["wi"] if len(self.activations) == 1 else [
        f"wi_{i}" for i in range(len(self.activations))]
    wi = [
        partitioning.param_with_axes(
            name, self.kernel_init, (features, self.intermediate_dim),
            jnp.float32, axes=in_axes).astype(self.dtype)
        for name in names
    ]
    wo = partitioning.param_with_axes(
        "wo", self.kernel_init, (self.intermediate_dim, features),
        jnp.float32, axes=in_axes[::-1]).astype(self.dtype)
    bi = bo = None
    if self.use_bias:
      bi = [
          partitioning.param_with_axes(
              f"{name}_bias", nn.initializers.zeros, (self.intermediate_dim,),
              jnp.float32, axes=(self.intermediate_axis_name,)).astype(self.dtype)
          for name in names
      ]
      bo = partitioning.param_with_axes(
          "wo_bias", nn.initializers.zeros, (features,), jnp.float32,
          axes=(self.input_axis_name,)).astype(self.dtype)
    dropout = nn.Dropout(rate=self.intermediate_dropout_rate)
    return mlp_forward(
        inputs.astype(self.dtype), wi, wo, self.activations, bi=bi, bo=bo,
        dropout=lambda h: dropout(h, deterministic=not enable_dropout),
    )


class RMSNorm(nn.Module):
  """T5 layer norm: scale-only RMS normalization, computed in float32.

  Attributes:
    epsilon: added to the mean square before the square root.
    dtype: output dtype.
  """

  epsilon: float = 1e-6
  dtype: types.DType = jnp.float32

  @nn.compact
  def __call__(self, x: types.Array) -> types.Array:
    x32 = x.astype(jnp.float32)
    # [batch, length, embed] -> [batch, length, 1]
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.epsilon)
    scale = partitioning.param_with_axes(
        "scale", nn.initializers.ones, (x.shape[-1],), jnp.float32, axes=("embed",))
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table (the decoder reads it as the tied output projection).

  Attributes:
    num_embeddings: vocabulary size.
    features: embedding width `d_model`.
    dtype: output dtype of lookups.
    embedding_init: initializer of the table.
    one_hot: look up by one-hot matmul (TPU-friendly under sharding) rather
      than by gather.
  """

  num_embeddings: int
  features: int
  dtype: types.DType = jnp.float32
  embedding_init: types.Initializer = nn.initializers.normal(stddev=1.0)
  one_hot: bool = False

  def setup(self):
    self.embedding = partitioning.param_with_axes(
        "embedding", self.embedding_init, (self.num_embeddings, self.features),
        jnp.float32, axes=("vocab", "embed"))

  def __call__(self, inputs: types.Array) -> types.Array:
    """Embeds integer ids `[batch, length]` -> `[batch, length, embed]`."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer token ids, got {inputs.dtype}.")
    table = self.embedding.astype(self.dtype)
    if self.one_hot:
      one_hot = jax.nn.one_hot(inputs, self.num_embeddings, dtype=self.dtype)
      return jnp.einsum("...v,vd->...d", one_hot, table)
    return jnp.take(table, inputs, axis=0)
