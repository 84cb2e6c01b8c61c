"""Random values in a parameter tree's shapes, drawn by numpy from a `jax.eval_shape` tree: compiling
Flax's initialisers (one threefry program per parameter) costs seconds on two cores, and a test whose
oracle gets the same weights does not need the model's own initial values."""

import jax
import numpy as np
from flax.linen import meta


def normal_like(tree, seed: int):
    """N(0, 1) arrays (numpy) in the shapes and dtypes of `tree`'s leaves (`ShapeDtypeStruct`s, boxed or
    not; the result is unboxed), drawn in the tree's leaf order."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), meta.unbox(tree))
