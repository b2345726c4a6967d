"""Where adapter files point: the layer names other tools write, mapped onto our parameters.

A LoRA-style file names each layer it changes, spelled one of several ways. kohya joins the module
path with underscores (`lora_unet_down_blocks_0_attentions_0_proj_in`), diffusers / PEFT keep the dots
(`unet.down_blocks.0.attentions.0.proj_in`). U-Net paths are diffusers' (kohya's SD 1.x / 2.x files,
PEFT) or the original ldm ones, which are ours; text-encoder paths are Hugging Face CLIPTextModel's
(SD 1.x, and what kohya converts SD 2.x's open_clip tower to) or open_clip's, which are ours. Every
spelling is looked up in one table per model, keyed by the underscore form.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ldm.attention import SpatialTransformer
from ldm.conditioner import Conditioner
from ldm.nn import Downsample, ResBlock, Upsample
from ldm.text_encoder import TextEncoder
from ldm.unet import UNetModel


@dataclass(frozen=True)
class Layer:
    """One weight an adapter can change: `component` ("unet" or "text_encoder"), the parameter's name
    in it, and the rows of that parameter (q, k or v of a fused attention projection; None = all)."""

    component: str
    weight: str
    rows: slice | None = None


def flat(name: str) -> str:
    """A dotted module path in kohya's underscore spelling."""
    return name.replace(".", "_")


# ldm ResBlock module -> diffusers ResnetBlock2D module.
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def diffusers_unet_names(unet: UNetModel) -> dict[str, str]:
    """Our U-Net's module names -> diffusers' UNet2DConditionModel names, for every module with weights.

    diffusers groups the ldm blocks by resolution: each level has `num_res_blocks` (down) or
    `num_res_blocks + 1` (up) resnets, as many attentions where the level has them, and one resampler.
    """
    modules = dict(unet.named_modules())
    names = {ours: theirs for ours, theirs in _UNET_FIXED.items() if ours in modules}  # label_emb: SDXL only
    per_level = unet.config.num_res_blocks + 1
    blocks = [(f"input_blocks.{i}", f"down_blocks.{(i - 1) // per_level}", (i - 1) % per_level, block)
              for i, block in enumerate(unet.input_blocks) if i > 0]
    blocks += [(f"output_blocks.{i}", f"up_blocks.{i // per_level}", i % per_level, block)
               for i, block in enumerate(unet.output_blocks)]
    resnets_seen = 0
    for k, layer in enumerate(unet.middle_block):
        index = resnets_seen if isinstance(layer, ResBlock) else 0
        resnets_seen += isinstance(layer, ResBlock)
        names.update(_layer_names(f"middle_block.{k}", "mid_block", index, layer))
    for prefix, base, index, block in blocks:
        for k, layer in enumerate(block):
            names.update(_layer_names(f"{prefix}.{k}", base, index, layer))
    return names


def _layer_names(ours: str, base: str, index: int, layer: nn.Module) -> dict[str, str]:
    if isinstance(layer, ResBlock):
        return {f"{ours}.{inner}": f"{base}.resnets.{index}.{theirs}" for inner, theirs in _RESNET.items()}
    if isinstance(layer, Downsample):
        return {f"{ours}.op": f"{base}.downsamplers.0.conv"}
    if isinstance(layer, Upsample):
        return {f"{ours}.conv": f"{base}.upsamplers.0.conv"}
    if isinstance(layer, SpatialTransformer):  # inside it, the names are the same
        return {f"{ours}.{inner}": f"{base}.attentions.{index}.{inner}" for inner, _ in layer.named_modules() if inner}
    raise TypeError(f"no diffusers name for {type(layer).__name__} at {ours}")


def unet_layers(unet: UNetModel) -> dict[str, Layer]:
    """Every linear and convolution weight of the U-Net, under its ldm and its diffusers name (flat)."""
    diffusers = diffusers_unet_names(unet)
    table = {}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            layer = Layer("unet", f"{name}.weight")
            table[flat(name)] = layer
            table[flat(diffusers[name])] = layer
    return table


def text_encoder_layers(text_encoder: TextEncoder | Conditioner) -> dict[str, Layer]:
    """Every linear weight of the text transformer, under its open_clip and its Hugging Face name (flat,
    with and without the `text_model.` level that transformers 5 dropped); Hugging Face's separate
    q / k / v projections are row slices of open_clip's fused `in_proj_weight`.

    SDXL's towers are told apart as kohya and diffusers do: names of CLIP ViT-L start `te1_` (or nothing:
    diffusers' `text_encoder.`), names of bigG `te2_` (`text_encoder_2.`), the refiner's bigG too.
    """
    if not isinstance(text_encoder, Conditioner):
        return _tower_layers(text_encoder, "", ("",))
    table = {}
    for index, tower in enumerate(text_encoder.embedders):
        names = ("te2_",) if tower.config.output_dim is not None else ("te1_", "")
        table.update(_tower_layers(tower, f"embedders.{index}.", names))
    return table


def _tower_layers(tower: TextEncoder, weight_prefix: str, name_prefixes: tuple[str, ...]) -> dict[str, Layer]:
    width, table = tower.config.width, {}
    for block in range(tower.config.layers):
        ours, theirs = f"transformer.resblocks.{block}", f"encoder.layers.{block}"
        pairs = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        named = {theirs + "." + hf: Layer("text_encoder", f"{weight_prefix}{ours}.{name}.weight")
                 for name, hf in pairs.items()}
        for k, projection in enumerate("qkv"):
            named[f"{theirs}.self_attn.{projection}_proj"] = Layer(
                "text_encoder", f"{weight_prefix}{ours}.attn.in_proj_weight", slice(k * width, (k + 1) * width))
        for prefix in name_prefixes:
            for hf, layer in named.items():
                table[prefix + flat(hf)] = table[prefix + flat("text_model." + hf)] = layer
            for name in pairs:
                table[prefix + flat(f"{ours}.{name}")] = named[f"{theirs}.{pairs[name]}"]
    return table
