"""Sample quality that nuance measures itself, offline: conditional accuracy and KID.

Feature network: nothing is downloaded. A small CNN is trained by nuance on the run's own real images
(labels from the shards' `cls`), once per dataset, and cached as safetensors under
`<data.cache_dir>/eval/`. It gives two numbers for a model's samples:

- **conditional accuracy**: the share of samples that the classifier assigns to the class they were
  generated for (class id, or for text models the class's most frequent caption as the prompt);
- **KID** (Binkowski et al. 2018, "Demystifying MMD GANs", eq. 4): the unbiased squared MMD between the
  classifier's penultimate features of real and generated images under the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets. 0 for samples from the data distribution.

Both depend on this classifier, so they compare runs on the same data, not against published FID/KID.
The classifier's own accuracy on held-out real images is reported beside them (`real_accuracy`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nuance.data.builder import build_stream, ensure_toy_dataset
from nuance.data.config import DataConfig
from nuance.trainers.inference import checkpoint_images, load_checkpoint_model

RESOLUTION = 32  # images are resized to this before the classifier: cheap on any data size
FEATURES = 128
MAX_CONDITIONS = 16  # the most frequent classes are evaluated (ImageNet's 1000 would cost too much)
FORMAT = 2  # bump when the classifier or its training changes: old caches are then ignored


class Classifier(nn.Module):
    """A small CNN: 32x32 RGB in [-1, 1] -> FEATURES-d features -> class logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        widths = (3, 32, 64, FEATURES)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, 2, 1)]
            layers += [nn.GroupNorm(8, c_out), nn.GELU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != RESOLUTION or images.shape[-2] != RESOLUTION:
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class RealSet:
    images: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    captions: list[str]


def load_real(data: DataConfig, max_samples: int) -> RealSet:
    """Up to `max_samples` labelled real images of the data, in the stream's order (one pass)."""
    if data.source == "toy":
        ensure_toy_dataset(data)
    overrides = {"batch_size": 64, "num_workers": 0, "random_flip": False, "random_crop": False}
    cfg = DataConfig(**{**data.__dict__, **overrides})
    images, labels, captions, seen, num_labelled = [], [], [], set(), 0
    for batch in build_stream(cfg, rank=0, world_size=1, seed=0):
        if "pixels" not in batch:
            raise ValueError(f"data.source={data.source}: quality evaluation needs image shards, not latents")
        if seen.intersection(batch["key"]):
            break  # the next epoch: every sample was seen once
        seen.update(batch["key"])
        keep = batch["class_label"] >= 0
        num_labelled += int(keep.sum())
        if len(seen) >= 256 and num_labelled == 0:
            break  # no class labels in the first batches: not a labelled dataset
        images.append(
            F.interpolate(
                batch["pixels"][keep], size=(RESOLUTION, RESOLUTION), antialias=True, mode="bilinear"
            )
        )
        labels.append(batch["class_label"][keep])
        captions += [c for c, k in zip(batch["caption"], keep.tolist()) if k]
        if num_labelled >= max_samples:
            break
    if num_labelled < 20:
        raise ValueError(
            f"data.source={data.source}: quality evaluation needs images with class labels (cls)"
        )
    return RealSet(torch.cat(images)[:max_samples], torch.cat(labels)[:max_samples], captions[:max_samples])


@torch.enable_grad()  # also when called from sampling code under no_grad
def train_classifier(real: RealSet, epochs: int = 10, seed: int = 0) -> tuple[Classifier, float]:
    """Fit on 90% of the real images; returns the classifier and its accuracy on the other 10%."""
    with torch.random.fork_rng(devices=[]):  # the training run's RNG stream stays untouched (exact resume)
        torch.manual_seed(seed)
        return _fit(real, epochs, torch.Generator().manual_seed(seed))


def _fit(real: RealSet, epochs: int, generator: torch.Generator) -> tuple[Classifier, float]:
    order = torch.randperm(len(real.labels), generator=generator)
    num_test = max(1, len(order) // 10)
    test, train = order[:num_test], order[num_test:]
    model = Classifier(int(real.labels.max()) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train), generator=generator)].split(128):
            x = real.images[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # the training stream flips too
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), real.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(real.images[test]).argmax(1) == real.labels[test]).float().mean().item()
    return model, accuracy


def kid(real: torch.Tensor, fake: torch.Tensor, num_subsets: int = 20, subset_size: int = 100) -> float:
    """Kernel Inception Distance of two feature sets (Binkowski et al. 2018): mean unbiased MMD^2."""
    real, fake = real.double(), fake.double()
    m = min(subset_size, len(real), len(fake))
    generator = torch.Generator().manual_seed(0)
    d = real.shape[1]
    total = 0.0
    for _ in range(num_subsets):
        x = real[torch.randperm(len(real), generator=generator)[:m]]
        y = fake[torch.randperm(len(fake), generator=generator)[:m]]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=torch.float64)
        total += ((k_xx * off).sum() + (k_yy * off).sum()) / (m * (m - 1)) - 2 * k_xy.mean()
    return float(total / num_subsets)


class Evaluator:
    """The classifier of one dataset, the real images' features, and each class's condition."""

    def __init__(self, classifier: Classifier, real: RealSet, real_accuracy: float):
        self.classifier, self.real_accuracy = classifier.eval(), real_accuracy
        with torch.no_grad():
            self.real_features = classifier.features(real.images)
        counts = Counter(real.labels.tolist())
        self.labels = sorted(c for c, _ in counts.most_common(MAX_CONDITIONS))
        by_class: dict[int, Counter] = {c: Counter() for c in self.labels}
        for label, caption in zip(real.labels.tolist(), real.captions):
            if label in by_class and caption:
                by_class[label][caption] += 1
        self.prompts = {c: (by_class[c].most_common(1)[0][0] if by_class[c] else "") for c in self.labels}

    @classmethod
    def for_data(cls, data: DataConfig, max_samples: int = 2048) -> Evaluator:
        """Train (or load the cached) classifier of `data`. The global RNGs are left as they were (the
        data loader and the classifier's init draw from them), so a training run that evaluates at a
        sample step still resumes exactly."""
        with torch.random.fork_rng(devices=[]):
            return cls._for_data(data, max_samples)

    @classmethod
    def _for_data(cls, data: DataConfig, max_samples: int) -> Evaluator:
        real = load_real(data, max_samples)
        key = json.dumps(
            [FORMAT, data.source, data.image_size, data.toy_samples, max_samples, len(real.labels)]
        )
        cache = (
            Path(os.path.expanduser(data.cache_dir)) / "eval" / hashlib.sha256(key.encode()).hexdigest()[:16]
        )
        weights, meta = cache / "classifier.safetensors", cache / "meta.json"
        if weights.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            classifier = Classifier(info["num_classes"])
            classifier.load_state_dict(load_file(weights))
            return cls(classifier, real, info["real_accuracy"])
        classifier, accuracy = train_classifier(real)
        cache.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"  # ranks that race here write the same bytes: last rename wins
        save_file(classifier.state_dict(), f"{weights}{suffix}")
        os.replace(f"{weights}{suffix}", weights)
        info = {"num_classes": classifier.head.out_features, "real_accuracy": accuracy}
        Path(f"{meta}{suffix}").write_text(json.dumps(info))
        os.replace(f"{meta}{suffix}", meta)
        return cls(classifier, real, accuracy)

    def conditions(self, conditioning: str) -> tuple[list[str], list[int]]:
        """(prompts, classes) to generate, one per evaluated class, for a text or class model."""
        if conditioning == "class":
            return [], list(self.labels)
        return [self.prompts[c] for c in self.labels], []

    @torch.no_grad()
    def kid_to(
        self, images: torch.Tensor, reference: torch.Tensor | None = None, num_subsets: int = 20
    ) -> float:
        """KID of images in [0, 1] against the real images, or against `reference` images in [0, 1]
        (e.g. a fine-tuning subset), in this classifier's feature space. More `num_subsets`: the same
        estimate with less noise from the choice of subsets (for comparisons of hundreds of samples)."""
        features = self.classifier.features(images.float() * 2 - 1)
        real = self.real_features if reference is None else self.classifier.features(reference * 2 - 1)
        return kid(real, features, num_subsets=num_subsets)

    @torch.no_grad()
    def score(self, images: torch.Tensor, per_condition: int) -> dict[str, float]:
        """Metrics of generated images in [0, 1], `per_condition` per class in `self.labels` order."""
        x = images.float() * 2 - 1
        target = torch.tensor(self.labels).repeat_interleave(per_condition)
        features = self.classifier.features(x)
        predicted = self.classifier.head(features).argmax(1)
        return {
            "accuracy": (predicted == target).float().mean().item(),
            "kid": kid(self.real_features, features),
            "real_accuracy": self.real_accuracy,
            "num_samples": float(len(x)),
        }


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    *,
    data_source: str | None = None,
    per_condition: int = 8,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: str = "default",
    use_ema: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Generate `per_condition` samples per evaluated class from a checkpoint and score them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe, comps = load_checkpoint_model(ckpt_dir, use_ema, device)
    data = (
        recipe.data if data_source is None else DataConfig(**{**recipe.data.__dict__, "source": data_source})
    )
    evaluator = Evaluator.for_data(data)
    prompts, classes = evaluator.conditions(comps.conditioner.conditioning)
    images, _ = checkpoint_images(
        recipe, comps, prompts, classes, per_condition, steps, cfg, sampler, seed, device
    )
    return evaluator.score(images, per_condition)
