"""Turn a batch's captions / class labels into the backbone's condition kwargs.

Also owns the null condition for classifier-free guidance (Ho & Salimans 2022): training drops the
condition with probability p (the empty caption, as in Stable Diffusion, or the extra "null" class
row of the label table, as in DiT), and sampling uses the same null condition as the unconditional
branch.
"""

from __future__ import annotations

import torch

from nuance.trainers.models.encoders import CaptionEncoder


class Conditioner:
    def __init__(
        self,
        conditioning: str,
        *,
        text_encoder: CaptionEncoder | None = None,
        num_classes: int | None = None,
        image_size: int = 0,
        uses_time_ids: bool = False,
        uses_pooled: bool = False,
    ):
        if conditioning == "text" and text_encoder is None:
            raise ValueError("text conditioning needs a text encoder")
        if conditioning == "class" and not num_classes:
            raise ValueError("class conditioning needs num_classes")
        self.conditioning = conditioning
        self.text_encoder = text_encoder
        self.num_classes = num_classes
        self.image_size = image_size
        self.uses_time_ids = uses_time_ids
        # SDXL's time ids come with the pooled embedding; MMDiT / Flux take the pooled embedding alone.
        self.uses_pooled = uses_pooled or uses_time_ids

    def _drop_mask(self, batch_size: int, p: float) -> torch.Tensor:
        # Global RNG on purpose: restoring it on resume reproduces the same drops.
        return torch.rand(batch_size) < p

    def from_labels(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"class labels must be in [0, {self.num_classes}); got {labels.tolist()[:8]}")
        return {"class_labels": labels.long()}

    def from_captions(self, captions: list[str], sizes: dict | None = None) -> dict[str, torch.Tensor]:
        hidden, mask, pooled = self.text_encoder(captions)
        return self._text_cond(hidden, mask, pooled, sizes)

    def _text_cond(self, hidden, mask, pooled, sizes: dict | None) -> dict[str, torch.Tensor]:
        cond = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        if self.uses_time_ids:
            cond.update(pooled=pooled, time_ids=self.time_ids(len(hidden), sizes))
        elif self.uses_pooled:
            cond["pooled"] = pooled
        return cond

    def time_ids(self, batch_size: int, sizes: dict | None = None) -> torch.Tensor:
        """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): (orig h, orig w, crop top, crop left,
        target h, target w), from the batch when the stream provides them, else the plain image size."""
        size = torch.tensor([self.image_size, self.image_size]).expand(batch_size, 2)
        sizes = sizes or {}
        parts = [
            sizes.get("original_size", size),
            sizes.get("crop_coords", torch.zeros_like(size)),
            sizes.get("target_size", size),
        ]
        return torch.cat([p.float() for p in parts], dim=1)

    def training(self, batch: dict, dropout: float) -> dict[str, torch.Tensor]:
        """Condition kwargs for a training batch, with CFG condition dropout."""
        if self.conditioning == "class":
            labels = batch["class_label"].clone()
            labels[self._drop_mask(len(labels), dropout)] = self.num_classes
            return self.from_labels(labels)
        sizes = {k: batch[k] for k in ("original_size", "crop_coords", "target_size") if k in batch}
        drop = self._drop_mask(len(batch["caption"]), dropout)
        if "encoder_hidden_states" in batch:  # precomputed text embeddings (latent shards)
            hidden, mask = batch["encoder_hidden_states"].clone(), batch["encoder_attention_mask"].clone()
            pooled = batch["pooled"].clone() if "pooled" in batch else hidden.mean(1)
            if drop.any():
                null_hidden, null_mask, null_pooled = (
                    t[0].to(hidden.device) for t in self.text_encoder([""])
                )
                hidden[drop], mask[drop], pooled[drop] = null_hidden, null_mask.to(mask.dtype), null_pooled
            return self._text_cond(hidden, mask, pooled, sizes)
        captions = list(batch["caption"])
        for i in torch.nonzero(drop).flatten().tolist():
            captions[i] = ""
        return self.from_captions(captions, sizes)

    def null(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self.conditioning == "class":
            return self.from_labels(torch.full((batch_size,), self.num_classes))
        return self.from_captions([""] * batch_size)

    def for_sampling(self, prompts: list[str], classes: list[int]) -> tuple[dict, list[str]]:
        """Condition kwargs for the recipe's sample prompts (text) or class ids; returns titles too."""
        if self.conditioning == "class":
            return self.from_labels(torch.tensor(classes)), [f"class {c}" for c in classes]
        return self.from_captions(list(prompts)), list(prompts)


def move_cond(cond: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in cond.items()}
