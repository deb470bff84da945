"""Names for the leaves of a parameter tree: `layers_0/attention/wq/kernel`.

Sharding rules, the optimizer's weight-decay mask, checkpoint shape checks and the Hugging Face
mapping all match leaves by this one spelling of their path.
"""

from __future__ import annotations

from typing import Any


def path_str(path: tuple[Any, ...]) -> str:
    """A `jax.tree_util` key path as 'a/b/0/c' (dict keys, sequence indices or attribute names)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
