"""EMA with warm-up: right from the first step, capped at the configured decay, resumed exactly."""

from __future__ import annotations

import math

import torch

from nuance.trainers.ema import EMA


def _module(value: float) -> torch.nn.Module:
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


def test_initial_weights_fade_as_the_warmup_predicts() -> None:
    module = _module(0.0)
    ema = EMA(module, decay=0.999)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0)  # the trained weights, constant from the first step on
    for n in range(1, 31):
        ema.update()
        share_of_init = math.factorial(n) * math.factorial(9) / math.factorial(n + 9)
        assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 1.0 - share_of_init), atol=1e-6)
    assert 1.0 - ema.shadow["weight"].mean().item() < 1e-6  # the random init is gone after 30 steps


def test_decay_is_capped_and_plain_ema_follows() -> None:
    ema = EMA(_module(0.0), decay=0.5)
    assert ema.current_decay() == 0.1  # (1 + 0) / (10 + 0)
    ema.num_updates = 100
    assert ema.current_decay() == 0.5
    before = ema.shadow["bias"].clone()
    with torch.no_grad():
        ema.params["bias"].fill_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["bias"], 0.5 * before + 0.5 * 2.0)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    source = torch.nn.Linear(4, 4)
    a, b = EMA(source, 0.99), None
    for _ in range(7):
        with torch.no_grad():
            source.weight.add_(torch.randn_like(source.weight))
        a.update()
    b = EMA(torch.nn.Linear(4, 4), 0.99)
    b.params = a.params  # the same live weights, a fresh shadow
    b.load_state_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in a.state_dict().items()})
    assert b.num_updates == 7
    for _ in range(5):
        with torch.no_grad():
            source.weight.add_(torch.randn_like(source.weight))
        a.update()
        b.update()
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
