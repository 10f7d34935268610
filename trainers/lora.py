"""LoRA and QLoRA adapters on a diffusers backbone, saved in the layout stock diffusers and peft load.

LoRA (Hu et al. 2021, eq. 3) keeps a pretrained weight W0 frozen and learns a low-rank update:
h = W0 x + (alpha / r) B A x, with A (r x in) and B (out x r), B = 0 at the start so training begins
exactly at the base model. QLoRA (Dettmers et al. 2023) stores the frozen W0 in 4-bit NormalFloat
(NF4, bitsandbytes `Linear4bit`) and back-propagates through the dequantized weight into the adapters.

The adapters are peft `LoraLayer`s injected into `backbone.net` with peft's `inject_adapter_in_model`,
the same call diffusers' `load_lora_adapter` makes, so the saved files load with stock code:

    lora/pytorch_lora_weights.safetensors   diffusers: keys `unet.<module>.lora_A.weight` (SD/SDXL U-Nets)
                                            or `transformer.<module>...` (DiT, PixArt, SD3, Flux),
                                            peft config in the safetensors metadata
                                            (`lora_adapter_metadata`), so `load_lora_adapter(dir,
                                            prefix=...)` and the SD / SDXL / SD3 / Flux pipelines'
                                            `load_lora_weights(dir)` read it
    lora/adapter_config.json                peft: `PeftModel.from_pretrained(net, dir)`, for every model
    lora/adapter_model.safetensors          class (diffusers 0.42 has no LoRA loader for DiT / PixArt)
    lora/nuance_lora.json                   family, base model folder and its fingerprint, QLoRA or not
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nuance.trainers.config import LoraConfig, RunConfig
from nuance.trainers.models.backbone import Backbone

ADAPTER = "default"  # peft's adapter name; one adapter per backbone
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
PEFT_CONFIG_NAME = "adapter_config.json"
INFO_NAME = "nuance_lora.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# The component name diffusers' pipelines use as the key prefix (`unet_name` / `transformer_name`).
PREFIX = {
    "dit": "transformer",
    "pixart": "transformer",
    "unet": "unet",
    "mmdit": "transformer",
    "flux": "transformer",
}

# Attention projections of every diffusers `Attention` (self- and cross-attention) and the two linears
# of the `FeedForward` MLP of each transformer block. The final `proj_out` of DiT / PixArt is left out:
# it is the model's output layer, not part of a block. Names are diffusers' own module names, so
# diffusers' loaders map the saved keys back without conversion.
_BLOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# U-Net transformer blocks also project into and out of the block (`Transformer2DModel.proj_in/out`;
# linear in SD2 / SDXL, 1x1 conv in SD1.x, which peft adapts with a conv LoRA).
_UNET_TARGETS = [*_BLOCK_TARGETS, "proj_in", "proj_out"]
# MMDiT (SD3) / Flux joint blocks: the image stream's and the text stream's (`add_*`, `to_add_out`,
# `ff_context`) attention projections and MLPs, as diffusers' SD3 / Flux LoRA training scripts target;
# Flux's single-stream blocks add their MLP input (`proj_mlp`; their `proj_out` shares its name with the
# model's output layer, so it is left out).
_JOINT_TARGETS = [
    *_BLOCK_TARGETS,
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def default_target_modules(family: str) -> list[str]:
    """Module names adapted when `lora.target_modules` is empty (peft matches them as name suffixes)."""
    targets = {
        "dit": _BLOCK_TARGETS,
        "pixart": _BLOCK_TARGETS,
        "unet": _UNET_TARGETS,
        "mmdit": _JOINT_TARGETS,
        "flux": [*_JOINT_TARGETS, "proj_mlp"],
    }
    if family not in targets:
        raise ValueError(f"no LoRA targets for model family {family!r}; expected one of {sorted(targets)}")
    return list(targets[family])


def peft_lora_config(cfg: LoraConfig, family: str):
    """peft's `LoraConfig` for the recipe's `lora` section: B = 0, A Kaiming-uniform (Hu et al. 2021,
    sec. 4.1), scale alpha / r."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or default_target_modules(family),
        init_lora_weights=True,
        bias="none",
    )


def compute_dtype(precision: str) -> torch.dtype:
    """QLoRA compute dtype: 4-bit weights are dequantized to the engine's precision for each matmul
    (bf16 in Dettmers et al. 2023; fp32 in CPU recipes, where bf16 matmuls are ~12x slower)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# -- QLoRA: the frozen base in 4-bit NF4 -------------------------------------------------------------
def _nf4_linear(linear: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes `Linear4bit` holding `linear`'s weight in NF4 with double quantization
    (Dettmers et al. 2023, sec. 3); quantization happens on `.to(device)`."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",  # no throwaway fp32 init of a weight that is replaced below
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.detach(),  # quantized where it is moved to: no fp32 copy of the model on the GPU
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        module=q,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first eval-mode no-grad forward (a
    # sample grid) into a bf16 layout whose matmul has no autograd path and whose inverse re-quantizes
    # the NF4 scales: training after sampling would lose gradients and drift the base. Keep one layout.
    q.support_avx512bf16_for_cpu = False
    return q.to(device)


def quantize_base(net: nn.Module, peft_cfg, dtype: torch.dtype, device: torch.device | str) -> list[str]:
    """Replace every `nn.Linear` that the adapters will target by an NF4 `Linear4bit` (QLoRA); the other
    layers (norms, embeddings, convs, the output layer) stay in full precision. Returns the names."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [
        name
        for name, module in net.named_modules()
        if type(module) is nn.Linear and check_target_module_exists(peft_cfg, name)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        setattr(parent, child, _nf4_linear(getattr(parent, child), dtype, torch.device(device)))
    return names


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear."""
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)
    return False


def check_quantized_base(net: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Guard after DeepSpeed took the module: every 4-bit base weight must still be a packed NF4
    `Params4bit` with its quantization state. DeepSpeed's bf16/fp16 mode casts only floating-point
    parameters (`p.data.to(bf16)` for fp16/bf16/fp32/fp64), so the uint8 NF4 storage passes untouched;
    this turns any future change of that behaviour into an error instead of silent garbage."""
    import bitsandbytes as bnb

    count = 0
    for name, module in net.named_modules():
        if not is_quantized(module):
            continue
        w = module.weight
        ok = isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and w.quant_state is not None
        ok = ok and not getattr(w.quant_state, "packing_format_for_cpu", False)
        if not ok or w.quant_type != "nf4" or (dtype is not None and module.compute_dtype != dtype):
            raise RuntimeError(
                f"QLoRA base layer {name} lost its NF4 state (weight {type(w).__name__} {w.dtype}, "
                f"compute dtype {module.compute_dtype}): the engine cast or replaced the 4-bit weights"
            )
        count += 1
    return count


def dequantized(module: nn.Module) -> nn.Module:
    """The full-precision `nn.Linear` (fp32) equal to what a 4-bit layer computes; other modules pass."""
    if not is_quantized(module):
        return module
    import bitsandbytes.functional as F

    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("4-bit weight in bitsandbytes' CPU inference layout; build it with apply_lora")
    weight = F.dequantize_4bit(module.weight.data, state).float()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return linear


# -- adapters ---------------------------------------------------------------------------------------
def apply_lora(
    backbone: Backbone,
    cfg: LoraConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[str]:
    """Freeze `backbone.net` and inject trainable LoRA adapters (Hu et al. 2021); with
    `cfg.quantize_base` first store the targeted base linears in NF4 (QLoRA, Dettmers et al. 2023).
    `dtype` is the 4-bit layers' compute dtype, `device` where they are quantized (default: where the
    net is). Returns the names of the adapted modules."""
    from peft import inject_adapter_in_model

    net = backbone.net
    if getattr(backbone, "lora_config", None) is not None:
        raise ValueError("the backbone already has LoRA adapters")
    peft_cfg = peft_lora_config(cfg, backbone.family)
    net.requires_grad_(False)  # the base is frozen; only the adapters created below train
    device = device if device is not None else next(net.parameters()).device
    if cfg.quantize_base:
        if not quantize_base(net, peft_cfg, dtype, device):
            raise ValueError(
                f"lora.quantize_base: none of lora.target_modules={peft_cfg.target_modules} is an "
                "nn.Linear to quantize (QLoRA quantizes linear layers only)"
            )
        if not next(net.parameters()).dtype.is_floating_point:  # Backbone casts inputs to this dtype
            raise ValueError("lora.target_modules must not include the model's first layer when quantizing")
    # peft picks its bitsandbytes-aware LoRA layer only for models flagged as loaded in 4-bit; the
    # flag is dropped again so diffusers' own 4-bit code paths (from_pretrained quantization) stay off.
    net.is_loaded_in_4bit = bool(cfg.quantize_base)
    try:
        inject_adapter_in_model(peft_cfg, net, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(f"lora.target_modules={peft_cfg.target_modules}: {err}") from err
    finally:
        del net.is_loaded_in_4bit
    if hasattr(net, "_hf_peft_config_loaded"):  # diffusers' PeftAdapterMixin (U-Net): its LoRA API works too
        net._hf_peft_config_loaded = True
    net.to(device)  # new adapter weights follow the base
    backbone.lora_config = cfg
    adapted = [name for name, _ in lora_layers(net)]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), "only adapter weights may train"
    return adapted


def lora_layers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, peft LoraLayer) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, module in net.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Adapter-only tensors (fp32, CPU) in diffusers' naming: `<unet|transformer>.<module>.lora_A.weight`."""
    from peft.utils import get_peft_model_state_dict

    prefix = PREFIX[backbone.family]
    state = get_peft_model_state_dict(backbone.net, adapter_name=ADAPTER)
    return {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


def _peft_metadata(backbone: Backbone) -> dict:
    """peft's config as a JSON-able dict (what diffusers' `save_lora_adapter` stores as metadata)."""
    config = backbone.net.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(backbone: Backbone, path: str | Path, info: dict | None = None) -> Path:
    """Write the adapters (only) to the folder `path`: diffusers' `pytorch_lora_weights.safetensors`
    (config in its metadata, as diffusers' pipelines' `save_lora_weights` writes it), peft's
    `adapter_config.json` + `adapter_model.safetensors`, and `nuance_lora.json` (`info` added)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prefix = PREFIX[backbone.family]
    tensors = lora_state_dict(backbone)
    config = _peft_metadata(backbone)
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}
    save_file(tensors, path / LORA_WEIGHT_NAME, metadata=metadata)
    # peft's own layout: keys relative to a PeftModel wrapping the net (`base_model.model.<module>...`).
    peft_tensors = {f"base_model.model.{k.removeprefix(prefix + '.')}": v for k, v in tensors.items()}
    save_file(peft_tensors, path / PEFT_WEIGHT_NAME, metadata={"format": "pt"})
    backbone.net.peft_config[ADAPTER].save_pretrained(str(path))
    cfg = backbone.lora_config
    record = {
        "family": backbone.family,
        "prefix": prefix,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.alpha / cfg.rank,
        "quantized_base": bool(cfg.quantize_base),
        **(info or {}),
    }
    (path / INFO_NAME).write_text(json.dumps(record, indent=1))
    return path


def load_adapter_weights(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights from a state dict in the backbone's own naming (a checkpoint's module
    state or EMA, `net.<module>.lora_A.default.weight`); every adapter weight must be there."""
    from nuance.trainers.engine import load_trainable

    load_trainable(backbone, state)


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, module)


@torch.no_grad()
def merge_lora(backbone: Backbone) -> None:
    """Fold the adapters into the base in place, W = W0 + (alpha / r) B A (Hu et al. 2021, eq. 3), and
    drop them: `backbone.net` becomes a plain diffusers model. A 4-bit base is first dequantized to fp32
    (the merged weights are full precision; W0 is the NF4 reconstruction the adapters trained with)."""
    for name, layer in list(lora_layers(backbone.net)):
        base = dequantized(layer.get_base_layer())
        delta = layer.get_delta_weight(ADAPTER)
        base.weight.data += delta.to(base.weight.dtype)
        _replace(backbone.net, name, base)
    _forget_adapters(backbone)


def unload_lora(backbone: Backbone) -> None:
    """Drop the adapters, leaving the (for QLoRA: dequantized fp32) base model."""
    for name, layer in list(lora_layers(backbone.net)):
        _replace(backbone.net, name, dequantized(layer.get_base_layer()))
    _forget_adapters(backbone)


def _forget_adapters(backbone: Backbone) -> None:
    net = backbone.net
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in net.__dict__:
            delattr(net, attr)
    backbone.lora_config = None


# -- checkpoints ------------------------------------------------------------------------------------
def base_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a diffusers model folder: config.json and, per weight file, its size and
    first / last MiB. Adapter-only checkpoints name their base by path; this catches a changed base."""
    folder = Path(os.path.expanduser(str(folder)))
    if (folder / "model_index.json").is_file():  # a stock pipeline folder: its backbone's folder
        folder = folder / ("unet" if (folder / "unet").is_dir() else "transformer")
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def check_base(ckpt_dir: str | Path, recipe: RunConfig) -> None:
    """Fail when `model.pretrained` is not the base the checkpoint's adapters were trained on."""
    info_path = Path(ckpt_dir) / "lora" / INFO_NAME
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    want, have = info.get("base_fingerprint"), base_fingerprint(recipe.model.pretrained)
    if want and want != have:
        raise ValueError(
            f"model.pretrained={recipe.model.pretrained} is not the base model the LoRA checkpoint "
            f"{ckpt_dir} was trained on (fingerprint {have}, trained on {want} at {info.get('base')})"
        )


def load_lora_checkpoint(
    ckpt_dir: str | Path, recipe: RunConfig, use_ema: bool = True, device: torch.device | str = "cpu"
):
    """Components of a kind-lora checkpoint: the base from `model.pretrained`, the adapters (QLoRA: on
    the NF4 base, as trained) with the checkpoint's (EMA) adapter weights."""
    from nuance.trainers import checkpoint
    from nuance.trainers.components import build_components

    pretrained = recipe.model.pretrained
    if not pretrained or not Path(os.path.expanduser(pretrained)).is_dir():
        raise ValueError(
            f"LoRA checkpoint {ckpt_dir} holds only adapters; its base model.pretrained={pretrained} "
            "is not a local folder"
        )
    check_base(ckpt_dir, recipe)
    comps = build_components(recipe, device)
    apply_lora(comps.backbone, recipe.lora, dtype=torch.float32, device=device)
    load_adapter_weights(comps.backbone, checkpoint.model_state_dict(ckpt_dir, use_ema=use_ema))
    comps.backbone.eval()
    return comps


def export_lora(backbone: Backbone, out: str | Path, *, merge: bool) -> str:
    """For `nuance export`: merge the adapters into the backbone (`merge`), or write them to `out` and
    drop them; either way `backbone.net` is left a plain diffusers model to `save_pretrained`."""
    if merge:
        merge_lora(backbone)
        return "merged"
    save_lora(backbone, out)
    unload_lora(backbone)
    return "adapters"
