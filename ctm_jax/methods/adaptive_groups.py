"""Adaptive loss weights per group of examples (CTM, Kim et al. 2024, eq. 13 / App. C).

The reference (Kim-Dongjun/ctm-cifar10 cm/train_util.py forward_backward, lines 1043-1093, and
cm/karras_diffusion.py calculate_adaptive_weight, lines 103-108) runs each GPU's batch in
microbatches of `--microbatch` examples and, for each one, sets
  lambda_k = clamp(||grad_W L_CTM,k|| / (||grad_W L_other,k|| + 1e-4), 0, 1e4)
from the microbatch's own mean losses (consistency_loss.mean(), denoising_loss.mean(),
get_DSM_loss lines 394-401; g_loss, get_GAN_loss lines 418-430), then backpropagates
L_CTM,k + lambda_k L_other,k.  Here the (micro)batch of B examples is split into G groups of
consecutive examples and each group gets its own lambda the same way.

The per-group gradients at W come from one backward pass: `tap_layer` wraps W's layer y = M(a; W)
in `_tap`, the identity in its forward pass whose cotangent for a zero (G, *W.shape) input delta
is sum_{i in group k} dM(a_i; W)/dW^T ct_i (M is linear in its kernel), i.e. grad_W of the
group's loss.  These are batched contractions over the group axis (no per-group full-parameter
gradients, no communication when the groups lie on one device each).  The final gradient is the
gradient of (1/B) sum_i [l_CTM,i + lambda_{k(i)} l_other,i]: the mean over groups of the
weighted group gradients.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.nets import layers


def find_param(params, path: str):
  """Look up a '/'-separated parameter path, with an error listing what is there."""
  node = params
  for p in path.split("/"):
    if not hasattr(node, "keys") or p not in node:
      have = sorted(node.keys())[:12] if hasattr(node, "keys") else type(node).__name__
      raise KeyError(f"parameter path {path!r}: {p!r} not found (have {have})")
    node = node[p]
  return node


def num_groups(batch: int, group_size: int) -> int:
  """G = batch / group_size (group_size 0: one group, the whole (micro)batch)."""
  if group_size == 0:
    return 1
  if batch % group_size:
    raise ValueError(f"config.ctm.adaptive_group_size = {group_size} must divide the "
                     f"(micro)batch of {batch} examples")
  return batch // group_size


def group_weights(wg_main, wg_other, max_value: float):
  """(G,) clamp(||W-grad of L_main,k|| / (||W-grad of L_other,k|| + 1e-4), 0, max_value), no
  gradient; wg_*: (G, *W.shape) per-group gradients at W."""
  norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(jnp.float32)),
                                    axis=1))
  return jax.lax.stop_gradient(jnp.clip(norm(wg_main) / (norm(wg_other) + 1e-4), 0.0, max_value))


def per_example(weights, batch: int):
  """(G,) group values -> (B,) for consecutive groups of B / G examples: a broadcast and a
  reshape, local to each device's examples (jnp.repeat's cumsum + gather made the SPMD
  partitioner all-gather the batch's indices and the (G,) values)."""
  g = weights.shape[0]
  return jnp.broadcast_to(weights[:, None], (g, batch // g)).reshape(batch)


def _grouped(v, groups: int):
  return v.astype(jnp.float32).reshape((groups, -1) + v.shape[1:])


def kernel_group_grads(a, ct, groups: int, kernel: int):
  """Per-group gradient of sum_i <ct_i, M(a_i; K)> w.r.t. the kernel K of a linear layer M:
  kernel 0 is a dense layer y = a K (K [in, out]); kernel k > 0 a stride-1 'same' k x k
  cross-correlation y[h, w] = sum_{i,j} a_pad[h + i, w + j] K[i, j] (K HWIO).  -> (G, *K.shape)."""
  if kernel == 0:
    a2 = _grouped(a.reshape(a.shape[0], -1, a.shape[-1]), groups)
    c2 = _grouped(ct.reshape(ct.shape[0], -1, ct.shape[-1]), groups)
    return jnp.einsum("gnpi,gnpo->gio", a2, c2)
  p = kernel // 2
  a_pad = _grouped(jnp.pad(a, ((0, 0), (p, p), (p, p), (0, 0))), groups)
  c = _grouped(ct, groups)
  h, w = c.shape[2], c.shape[3]
  rows = [jnp.stack([jnp.einsum("gnhwc,gnhwo->gco", a_pad[:, :, i:i + h, j:j + w], c)
                     for j in range(kernel)], axis=1) for i in range(kernel)]
  return jnp.stack(rows, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tap(y, a, delta, groups, kernel):
  """y, unchanged; the cotangent of delta (G, *K.shape) is the per-group kernel gradient."""
  del a, delta
  return y


def _tap_fwd(y, a, delta, groups, kernel):
  del delta
  return y, a


def _tap_bwd(groups, kernel, a, ct):
  return ct, jnp.zeros_like(a), kernel_group_grads(a, ct, groups, kernel)


_tap.defvjp(_tap_fwd, _tap_bwd)


def linear_kernel_size(module) -> int:
  """0 for a dense layer, k for a stride-1 k x k convolution without resampling; else an error."""
  if isinstance(module, (nn.Dense, layers.Linear)):
    return 0
  if isinstance(module, layers.Conv2d) and module.kernel and not (module.up or module.down):
    return int(module.kernel)
  raise ValueError(f"layer {'/'.join(module.path)!r} is a {type(module).__name__}; per-group "
                   f"adaptive weights need a dense layer or a stride-1 Conv2d without resampling")


def tap_layer(fn, path: str, delta):
  """fn() with the layer owning the kernel at `path` tapped by delta (G, *kernel.shape), so
  that the cotangent of delta is the per-group kernel gradient.  The layer must be applied
  exactly once, to inputs whose leading axis is the batch."""
  module_path = tuple(path.split("/")[:-1])
  if path.split("/")[-1] != "kernel":
    raise ValueError(f"per-group adaptive weights need a layer's 'kernel', got {path!r}")
  hits = []

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or tuple(context.module.path) != module_path:
      return y
    hits.append(context.module.path)
    return _tap(y, args[0], delta, delta.shape[0], linear_kernel_size(context.module))

  with nn.intercept_methods(interceptor):
    out = fn()
  if len(hits) != 1:
    raise ValueError(f"layer {'/'.join(module_path)!r} was applied {len(hits)} times (needs 1)")
  return out
