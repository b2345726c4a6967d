"""Trainable LoRA layers on a frozen U-Net (and text encoder), and the kohya file they export.

Each targeted layer W (linear, or a convolution: LoCon) gets a pair `down` (rank, in[, kh, kw]) and `up`
(out, rank[, 1, 1]); the layer then computes W x + (alpha / rank) up(down(x)). `up` starts at zero, so
training starts from the base model's outputs, and the base weights are never written.

In the U-Net the pair runs beside the layer, through a forward hook on the layer: no weight-sized
product per step, and the hook also runs when gradient checkpointing recomputes a block during the
backward pass. The text encoder's attention is one fused `nn.MultiheadAttention` whose q / k / v / out
projections are not modules a hook can reach, so there the deltas are added to the weights inside
`encode` (`torch.func.functional_call`); the text encoder is small and is not checkpointed.

Keys are kohya's (`ldm.lora` module docstring): `lora_unet_` + the layer's diffusers path and
`lora_te_` + its Hugging Face CLIP path, with underscores; diffusers' `load_lora_weights`, AUTOMATIC1111
and ComfyUI read the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.attention import SpatialTransformer
from ldm.layer_names import Layer, diffusers_unet_names, flat, text_encoder_layers, unet_layers
from ldm.lora import Adapter
from ldm.nn import Downsample, ResBlock, Upsample
from ldm.text_encoder import TextEncoder
from ldm.unet import UNetModel

# Which U-Net blocks' linear and convolution layers get LoRA pairs: kohya's default (every layer of the
# transformer blocks, proj_in / proj_out included), and with "+conv" also the ResBlocks and resamplers (LoCon).
TARGET_BLOCKS = {"attention": (SpatialTransformer,), "attention+conv": (SpatialTransformer, ResBlock, Downsample,
                                                                        Upsample)}
UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
# The text encoder's layers under their Hugging Face names, as kohya targets them (CLIPAttention, CLIPMLP).
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class LoRALayer(nn.Module):
    """One layer's pair: `forward(x)` is the change (alpha / rank) up(down(x)) of the layer's output."""

    def __init__(self, down: nn.Linear | nn.Conv2d, up: nn.Linear | nn.Conv2d, alpha: float) -> None:
        super().__init__()
        self.down, self.up = down, up
        nn.init.zeros_(self.up.weight)
        self.alpha, self.scale = alpha, alpha / down.weight.shape[0]

    @classmethod
    def beside(cls, base: nn.Linear | nn.Conv2d, rank: int, alpha: float) -> LoRALayer:
        """The pair for layer `base`; on a convolution (LoCon) down has its kernel and stride, up is 1 x 1."""
        if isinstance(base, nn.Linear):
            return cls(nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False),
                       alpha)
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        return cls(down, nn.Conv2d(rank, base.out_channels, 1, bias=False), alpha)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale

    def delta(self) -> Tensor:
        """The change of the layer's weight, (out, in[, kh, kw]) float32, for a weight-space merge."""
        down = self.down.weight.float().flatten(1)
        return (self.up.weight.float().flatten(1) @ down * self.scale).reshape(-1, *self.down.weight.shape[1:])


def unet_targets(unet: UNetModel, targets: str) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """(name, layer) of every linear and convolution layer inside the `targets` blocks of `unet`."""
    for name, block in unet.named_modules():
        if isinstance(block, TARGET_BLOCKS[targets]):
            for inner, layer in block.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    yield f"{name}.{inner}", layer


class LoRANetwork(nn.Module):
    """The LoRA pairs of a U-Net (`unet_layers`, keyed by the flat diffusers path) and, optionally, of a
    text encoder (`text_layers`, keyed by the flat Hugging Face path); only these train.

    Building it hooks the pairs into `unet`; they act while `enabled`. Copies of the network (the EMA's)
    hold the same pairs' values but are not hooked: they are read by `kohya_tensors` and `adapter`.
    """

    def __init__(self, unet: UNetModel, targets: str, rank: int, alpha: float,
                 text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.targets, self.enabled = rank, alpha, targets, True
        names = diffusers_unet_names(unet)
        self.unet_layers = nn.ModuleDict()
        for name, layer in unet_targets(unet, targets):
            key = flat(names[name])
            self.unet_layers[key] = LoRALayer.beside(layer, rank, alpha)
            layer.register_forward_hook(self._hook(self.unet_layers[key]))
        self.text_layers = nn.ModuleDict()
        if text_encoder is not None:
            table = text_encoder_layers(text_encoder)
            for block in range(text_encoder.config.layers):
                for name in TEXT_LAYERS:
                    key = flat(f"text_model.encoder.layers.{block}.{name}")
                    weight = _text_weight(text_encoder, table[key])
                    self.text_layers[key] = LoRALayer(nn.Linear(weight.shape[1], rank, bias=False),
                                                      nn.Linear(rank, weight.shape[0], bias=False), alpha)

    def _hook(self, pair: LoRALayer) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor | None]:
        def add_pair(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            return output + pair(args[0]) if self.enabled else None
        return add_pair

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The U-Net without the hooked pairs (to sample from weights with a LoRA merged in)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def encode(self, text_encoder: TextEncoder, prompts: list[str]) -> Tensor:
        """Context (B, L, D) of `prompts` from the text encoder with its pairs' deltas added to its weights."""
        weights: dict[str, Tensor] = {}
        table = text_encoder_layers(text_encoder)
        for key, pair in self.text_layers.items():
            layer = table[key]
            weight = weights.get(layer.weight, text_encoder.get_parameter(layer.weight))
            delta = pair.delta().to(weight.dtype)
            if layer.rows is not None:  # q, k or v: rows of the fused projection
                rows, delta = delta, torch.zeros_like(weight)
                delta[layer.rows] = rows
            weights[layer.weight] = weight + delta
        return torch.func.functional_call(text_encoder, weights, (prompts,), strict=False)

    def kohya_tensors(self) -> dict[str, Tensor]:
        """The pairs as a kohya LoRA state dict (float32, on the CPU)."""
        tensors = {}
        for prefix, layers in ((UNET_PREFIX, self.unet_layers), (TEXT_PREFIX, self.text_layers)):
            for key, pair in layers.items():
                tensors |= {f"{prefix}{key}.lora_down.weight": pair.down.weight.detach().float().cpu(),
                            f"{prefix}{key}.lora_up.weight": pair.up.weight.detach().float().cpu(),
                            f"{prefix}{key}.alpha": torch.tensor(float(pair.alpha))}
        return tensors

    def adapter(self, unet: UNetModel, text_encoder: TextEncoder, name: str) -> Adapter:
        """The pairs as an `Adapter` of the model, to merge with `Pipeline.adapters` (for sample images)."""
        tables = {"unet": unet_layers(unet), "text_encoder": text_encoder_layers(text_encoder)}
        changes = []
        for component, layers in (("unet", self.unet_layers), ("text_encoder", self.text_layers)):
            for key, pair in layers.items():
                changes.append((tables[component][key], {"down": pair.down.weight.detach(),
                                                         "up": pair.up.weight.detach(),
                                                         "alpha": torch.tensor(float(pair.alpha))}))
        return Adapter(Path(name), changes)


def _text_weight(text_encoder: TextEncoder, layer: Layer) -> Tensor:
    weight = text_encoder.get_parameter(layer.weight)
    return weight if layer.rows is None else weight[layer.rows]
