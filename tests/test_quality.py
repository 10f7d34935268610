"""The quality metric (nuance.trainers.quality): its classifier, KID, and the scores of known inputs."""

from __future__ import annotations

import pytest
import torch

from nuance.data.config import DataConfig
from nuance.trainers.quality import Evaluator, kid, load_real


@pytest.fixture(scope="module")
def toy_data(toy_cache) -> DataConfig:
    return DataConfig(cache_dir=str(toy_cache))


@pytest.fixture(scope="module")
def evaluator(toy_data) -> Evaluator:
    return Evaluator.for_data(toy_data)


def _real_by_class(real, labels: list[int], per_class: int) -> torch.Tensor:
    picks = [(real.labels == c).nonzero().flatten()[-per_class:] for c in labels]
    return (real.images[torch.cat(picks)] + 1) / 2


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same, shifted, far = kid(a, b), kid(a, b + 0.5), kid(a, b + 2.0)
    assert abs(same) < 0.02
    assert 0.05 < shifted < far


def test_classifier_learns_the_toy_classes_and_is_cached(toy_data, evaluator) -> None:
    assert evaluator.real_accuracy >= 0.95  # on held-out real images
    assert evaluator.labels == list(range(12))
    assert evaluator.prompts[0] == "a red circle" and evaluator.prompts[11] == "a yellow triangle"
    assert evaluator.conditions("class") == ([], list(range(12)))
    cached = Evaluator.for_data(toy_data)  # second time: loaded from the safetensors cache
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(cached.classifier(x), evaluator.classifier(x))


def test_real_images_score_high_and_noise_scores_low(toy_data, evaluator) -> None:
    real = load_real(toy_data, 2048)
    good = evaluator.score(_real_by_class(real, evaluator.labels, 8), per_condition=8)
    noise_images = torch.rand(96, 3, 32, 32)
    noise = evaluator.score(noise_images, per_condition=8)
    wrong = evaluator.score(_real_by_class(real, evaluator.labels[::-1], 8), per_condition=8)
    assert good["accuracy"] >= 0.95 and good["kid"] < 0.05
    assert noise["accuracy"] < 0.3 and noise["kid"] > 10 * max(good["kid"], 0.01)
    assert wrong["accuracy"] < 0.2  # the right images for the wrong classes score as wrong
    # more subsets: the same estimate, less noise from the choice of subsets (the distillation tests)
    assert evaluator.kid_to(noise_images, num_subsets=200) == pytest.approx(noise["kid"], rel=0.1)
