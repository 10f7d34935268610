"""Engine settings for models whose optimizer does not fit: partial offload and bf16 master weights.

The numbers they buy were measured on an H100 (benchmarks/large.py -> benchmarks/results/large_h100.json;
`python benchmarks/large.py --smoke --json F` runs the same rows on tiny presets on a CPU); here: the recipe
keys, their checks, and the DeepSpeed config derived from them.
"""

from __future__ import annotations

import pytest

from nuance.data.config import ConfigError
from nuance.trainers.config import EngineConfig, OptimConfig
from nuance.trainers.engine import deepspeed_config, uses_cpu_adam


def _ds(**engine) -> dict:
    return deepspeed_config(EngineConfig(**engine), OptimConfig(), micro_batch=2, world_size=1)


def test_bf16_master_weights_reach_deepspeed() -> None:
    config = _ds(zero_stage=3, precision="bf16", offload_optimizer=True, master_weights="bf16")
    assert config["bf16"] == {
        "enabled": True,
        "bf16_master_weights_and_grads": True,
        "bf16_optimizer_states": True,
    }
    assert "bf16_master_weights_and_grads" not in _ds(zero_stage=3, precision="bf16")["bf16"]


def test_offload_ratio_reaches_deepspeed_only_below_one() -> None:
    partial = _ds(zero_stage=3, precision="bf16", offload_optimizer=True, offload_ratio=0.7)
    assert partial["zero_optimization"]["offload_optimizer"]["ratio"] == 0.7
    full = _ds(zero_stage=3, precision="bf16", offload_optimizer=True)
    assert "ratio" not in full["zero_optimization"]["offload_optimizer"]


@pytest.mark.parametrize(
    ("engine", "key"),
    [
        ({"zero_stage": 3, "offload_ratio": 0.5}, "offload_ratio"),  # nothing offloaded
        ({"zero_stage": 2, "offload_optimizer": True, "offload_ratio": 0.5}, "offload_ratio"),  # ZeRO-3 only
        ({"zero_stage": 3, "offload_optimizer": True, "offload_ratio": 0.0}, "offload_ratio"),
        ({"zero_stage": 3, "offload_optimizer": True, "offload_ratio": 1.5}, "offload_ratio"),
        ({"zero_stage": 3, "offload_optimizer": True, "master_weights": "bf16"}, "master_weights"),  # fp32
        ({"zero_stage": 3, "precision": "bf16", "master_weights": "bf16"}, "master_weights"),  # no offload
        ({"zero_stage": 3, "precision": "bf16", "master_weights": "fp16"}, "master_weights"),
    ],
)
def test_settings_that_cannot_work_name_their_key(engine: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        EngineConfig(**engine)


def test_cpu_adam_where_deepspeed_requires_it_and_not_in_cpu_runs() -> None:
    # On a CPU-only machine a plain offload keeps torch's AdamW (no JIT build in tests) ...
    assert not uses_cpu_adam(EngineConfig(zero_stage=3, offload_optimizer=True))
    assert not uses_cpu_adam(EngineConfig(zero_stage=2))
    # ... and DeepSpeed's CPU Adam is chosen where DeepSpeed accepts nothing else.
    assert uses_cpu_adam(EngineConfig(zero_stage=3, offload_optimizer=True, offload_ratio=0.5))
    bf16 = EngineConfig(zero_stage=3, precision="bf16", offload_optimizer=True, master_weights="bf16")
    assert uses_cpu_adam(bf16)
