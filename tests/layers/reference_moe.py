"""An independent numpy MoE used as the tests' oracle (no capacity, no groups)."""

import numpy as np


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def expert_ffn(x, wi_0, wi_1, wo):
  """Gated-GELU FFN of one expert on one token."""
  return (gelu_tanh(x @ wi_0) * (x @ wi_1)) @ wo


def token_choice_moe(x, router_w, wi_0, wi_1, wo, k, gshard=False):
  """Every token goes to its top-k experts, weighted by router probability.

  Args:
    x: [tokens, embed]; router_w: [embed, experts]; wi_*: [experts, embed, ff];
    wo: [experts, ff, embed]; k: experts per token; gshard: renormalize the
    top-2 gates to sum to one.
  """
  probs = softmax(x.astype(np.float64) @ router_w)
  out = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    top = np.argsort(-probs[t], kind="stable")[:k]
    gates = probs[t, top]
    if gshard:
      gates = gates / gates.sum()
    for e, g in zip(top, gates):
      out[t] += g * expert_ffn(x[t], wi_0[e], wi_1[e], wo[e])
  return out
