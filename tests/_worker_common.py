"""What the test workers share (``_dist_worker``, ``_rl_worker``): the digest that compares parameters across runs."""

from __future__ import annotations

import hashlib

import torch


def param_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted (name, bytes) of every tensor of ``state``: equal iff the parameters are equal."""
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
