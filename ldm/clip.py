"""A small CLIP: our text encoder plus an open_clip vision transformer, trained contrastively.

The text tower *is* a `TextEncoder`, so after training it is exported on its own and loaded by
the diffusion stage unchanged. The CLIP text embedding is read from the same per-token context
the U-Net attends to: the context at the end-of-text position (the highest token id, as open_clip's
"argmax" pooling), projected by `text_projection`. Training the embedding therefore trains the very
features the diffusion model sees. With `layer: penultimate` the last block is never run here, so
it stays at its initialisation; use `layer: last` when training a text encoder from scratch.

State dict layout: `text.*` (exactly the `TextEncoder` keys), `text_projection` (width, embed_dim),
`visual.*` (open_clip `VisionTransformer`), `logit_scale` (log of the similarity multiplier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ldm.config import config_dict, config_kwargs
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.weights_io import load_module_file, load_strict

# CLIP's initial temperature 0.07 and its cap on the multiplier (Radford et al. 2021).
_INIT_LOGIT_SCALE = 1 / 0.07
_MAX_LOGIT_SCALE = 100.0


@dataclass
class VisionConfig:
    """The image tower: a ViT over `image_size` x `image_size` images cut in `patch_size` patches.

    `pool` is open_clip's `pool_type`: "avg" (mean of the patch tokens) or "tok" (class token,
    CLIP's choice); `pos_embed` is "sin_cos_2d" (fixed, needs width % 4 == 0) or "learnable"
    (CLIP's choice). The defaults are for position: shapes-v1 shapes are small, and a freshly
    initialised ViT is nearly blind to where they lie (moving a shape changes its embedding about
    20x less than recolouring it). With a class token over learned positions, contrastive training
    on shapes-v1 stayed at chance on position even with hard negatives; the mean of tokens carrying
    fixed 2-D positions learns it (ldm/weights/MODEL_CARD.md, "How the recipe got here").
    """

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "avg"
    pos_embed: str = "sin_cos_2d"

    def __post_init__(self) -> None:
        if self.pool not in ("avg", "tok"):
            raise ValueError(f"pool must be 'avg' or 'tok', got {self.pool!r}")
        if self.pos_embed not in ("learnable", "sin_cos_2d"):
            raise ValueError(f"pos_embed must be 'learnable' or 'sin_cos_2d', got {self.pos_embed!r}")
        if self.pos_embed == "sin_cos_2d" and self.width % 4:
            raise ValueError(f"pos_embed 'sin_cos_2d' needs a vision width divisible by 4, got {self.width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} must be divisible by heads {self.heads}")


@dataclass
class ClipConfig:
    """The `clip:` section of a training YAML: shared embedding size, text tower, vision tower."""

    embed_dim: int = 128
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(width=128, layers=4, heads=4))
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        if self.text.output_dim is not None:
            # The projection lives beside the tower (`text_projection`), so the exported text
            # encoder is the bare tower that the diffusion stage loads.
            raise ValueError("clip.text.output_dim must be unset; the embedding size is clip.embed_dim")

    @classmethod
    def from_dict(cls, params: dict) -> ClipConfig:
        """From nested dicts (`text:` and `vision:` sub-sections); unknown keys raise ValueError."""
        params = dict(params)
        if "text" in params:
            params["text"] = TextEncoderConfig(**config_kwargs(TextEncoderConfig, params["text"]))
        if "vision" in params:
            params["vision"] = VisionConfig(**config_kwargs(VisionConfig, params["vision"]))
        return cls(**config_kwargs(cls, params))

    def to_dict(self) -> dict:
        return {"embed_dim": self.embed_dim, "text": config_dict(self.text), "vision": config_dict(self.vision)}


class SmallCLIP(nn.Module):
    """Text and image towers mapping into one normalized embedding space of size `embed_dim`."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        # TextEncoder starts frozen and in eval mode for inference; here it is trained.
        self.text = TextEncoder(config.text).requires_grad_(True).train()
        self.text_projection = nn.Parameter(torch.randn(config.text.width, config.embed_dim) * config.text.width**-0.5)
        vision = config.vision
        self.visual = VisionTransformer(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.width,
            layers=vision.layers,
            heads=vision.heads,
            mlp_ratio=vision.mlp_ratio,
            output_dim=config.embed_dim,
            pos_embed_type=vision.pos_embed,
            pool_type=vision.pool,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(_INIT_LOGIT_SCALE)))
        # open_clip's image transform ends with these; our images are in [-1, 1] instead of [0, 1].
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1), persistent=False)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> unit-length embeddings (B, embed_dim)."""
        size = self.config.vision.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}) in [-1, 1], got {tuple(images.shape)}")
        pixels = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std
        return F.normalize(self.visual(pixels), dim=-1)

    def encode_text(self, prompts: list[str] | Tensor) -> Tensor:
        """Prompts (or token ids (B, context_length)) -> unit-length embeddings (B, embed_dim)."""
        tokens = prompts if isinstance(prompts, Tensor) else self.text.tokenize(prompts)
        context = self.text.encode_tokens(tokens)
        end_of_text = tokens.to(context.device).argmax(dim=-1)
        pooled = context[torch.arange(context.shape[0], device=context.device), end_of_text]
        return F.normalize(pooled @ self.text_projection, dim=-1)

    def forward(self, images: Tensor, prompts: list[str] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) and T prompts -> image embeddings (B, E), text embeddings (T, E), and the
        similarity multiplier (a scalar).

        The multiplier is exp(`logit_scale`) capped at 100, as in CLIP.
        """
        logit_scale = self.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)
        return self.encode_image(images), self.encode_text(prompts), logit_scale


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a batch, with several positives per row allowed.

    `image_features` (B, E) and `text_features` (T, E) are unit length; `logit_scale` multiplies
    the cosine similarities. `positives` (B, T) bool marks which texts describe which images
    (`positives[i, j]`: text j describes image i); each image's target is uniform over its
    positive texts, each text's uniform over its positive images. Every image needs a positive.
    Texts that describe no image in the batch (extra hard negatives, T > B) only act as negatives:
    they get no text -> image term. None means one positive each on the diagonal (T = B), which
    is CLIP's loss (open_clip's `ClipLoss`).
    """
    logits = logit_scale * image_features @ text_features.T
    if positives is None:
        positives = torch.eye(*logits.shape, dtype=torch.bool, device=logits.device)
    positives = positives.to(device=logits.device, dtype=logits.dtype)
    image_loss = F.cross_entropy(logits, positives / positives.sum(dim=1, keepdim=True))
    described = positives.sum(dim=0) > 0
    text_targets = positives.T[described]
    text_loss = F.cross_entropy(logits.T[described], text_targets / text_targets.sum(dim=1, keepdim=True))
    return (image_loss + text_loss) / 2


@torch.no_grad()
def clip_score(model: SmallCLIP, images: Tensor, prompts: list[str]) -> Tensor:
    """CLIP score of each image against its prompt: 100 x cosine similarity, (B, 3, H, W) x B -> (B,).

    The x100 scale is the usual CLIP-score convention (e.g. torchmetrics' CLIPScore); values are
    not clamped at 0 here. Only comparable between runs scored with the same CLIP.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    return 100 * (model.encode_image(images) * model.encode_text(prompts)).sum(dim=-1)


def load_clip(path: str | Path) -> SmallCLIP:
    """A CLIP exported by a training run (`clip.safetensors`), frozen and in eval mode."""
    state_dict, config, _ = load_module_file(path, "clip")
    model = SmallCLIP(ClipConfig.from_dict(config))
    load_strict(model, state_dict, "clip", path)
    return model.requires_grad_(False).eval()
