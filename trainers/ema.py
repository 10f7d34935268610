"""Exponential moving average of the trainable weights, sharded the way the weights are.

The decay warms up: update n (0-based) uses min(decay, (1 + n) / (10 + n)), the schedule of diffusers'
`EMAModel` (after Tensorflow's ExponentialMovingAverage with num_updates). Without it the shadow starts
as the random initial weights and forgets them only at the full decay's pace: after 1,500 updates at
0.999, 0.999^1500 = 22% of the shadow would still be the initialisation. With the warm-up the share of
the initial weights after n updates is prod_k (1 + k) / (10 + k) = n! 9! / (n + 9)!, under 1e-8 after
30 updates, and the average spans about the last tenth of the run until 1 / (1 - decay) caps it.
`num_updates` is saved and resumed.

Under ZeRO-3 each rank keeps the EMA of only the parameter partition it owns (`p.ds_tensor`), so
EMA memory shrinks with the world size like the weights do; otherwise rank 0's copy is the whole
EMA. `consolidate` rebuilds full tensors from the saved per-rank shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shadow = {name: _local(p).detach().float().clone() for name, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay the next update uses (warm-up: (1 + n) / (10 + n), capped at `decay`)."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        shadows = list(self.shadow.values())
        torch._foreach_lerp_(shadows, [_local(p).float() for p in self.params.values()], weight)
        self.num_updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily run the module with EMA weights (every rank must enter it under ZeRO-3)."""
        backup = {name: _local(p).clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            _local(p).copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                _local(p).copy_(backup[name])

    def state_dict(self) -> dict:
        meta = {
            name: (tuple(getattr(p, "ds_shape", p.shape)), getattr(p, "ds_numel", p.numel()))
            for name, p in self.params.items()
        }
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "partitioned": self.partitioned,
            "shadow": self.shadow,
            "meta": meta,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
        self.num_updates = state["num_updates"]


def consolidate(shards: list[dict]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the per-rank states (rank order); one unpartitioned state passes through."""
    first = shards[0]
    if not first["partitioned"]:
        return dict(first["shadow"])
    full = {}
    for name, (shape, numel) in first["meta"].items():
        flat = torch.cat([s["shadow"][name].flatten() for s in shards])  # ZeRO-3 pads the last partition
        full[name] = flat[:numel].view(shape).clone()
    return full
