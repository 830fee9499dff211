"""First maximum of a set of candidates, NaN included: the rule every arg-max here follows.

A candidate beats the best so far if it is larger, or NaN where the best is not (NaN beats
every number, as in jnp.max and jnp.argmax); among equal values the first one, or the one with
the lowest key, wins. Max pooling, the SPP op and the windowed SPP op all pick with `beats`,
so a gradient goes to the same cell whichever of them computed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp


def beats(v: jax.Array, best: jax.Array, kv: jax.Array | None = None,
          kbest: jax.Array | None = None) -> jax.Array:
  """Whether v takes the place of best: larger, or NaN over a number.

  With keys (kv, kbest), a tie (equal values, or NaN and NaN) goes to the lower key.
  """
  v_nan, best_nan = jnp.isnan(v), jnp.isnan(best)
  out = (v > best) | (v_nan & ~best_nan)
  if kv is None:
    return out
  tie = (v == best) | (v_nan & best_nan)
  return out | (tie & (kv < kbest))


def first_max(candidates: Sequence[jax.Array], labels: Iterable[int],
              dtype) -> tuple[jax.Array, jax.Array]:
  """Maximum of same-shape candidates and the label (in `dtype`) of the first that holds it."""
  labels = list(labels)
  best, arg = candidates[0], jnp.full(candidates[0].shape, labels[0], dtype)
  for v, label in zip(candidates[1:], labels[1:]):
    better = beats(v, best)
    # The same value as where(better, v, best) (up to the sign of a zero), one op cheaper.
    best = jnp.maximum(best, v)
    arg = jnp.where(better, jnp.asarray(label, dtype), arg)
  return best, arg


__all__ = ["beats", "first_max"]
