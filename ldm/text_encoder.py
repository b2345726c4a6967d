"""Frozen CLIP text transformer: prompts -> context (B, 77, width) for the U-Net's cross-attention.

This is the only module that imports open_clip. Stable Diffusion 1.x conditions on the OpenAI
CLIP ViT-L/14 text model (last layer, final LayerNorm); 2.x on the OpenCLIP ViT-H/14 text tower
(penultimate layer, then the final LayerNorm). Both are the same architecture, so one open_clip
`TextTransformer` serves both; 1.x checkpoints store it in the Hugging Face layout, which
`hf_clip_text_to_open_clip` renames. Weights are never downloaded: the tower is built with random
init and filled from a checkpoint.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import open_clip
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from ldm.errors import InputError, excerpt

# The CLIP BPE tokenizer's ids run up to its end-of-text token, 49407.
_CLIP_VOCAB_SIZE = 49408


@dataclass
class TextEncoderConfig:
    """Shape and behaviour of the text encoder.

    `layer` picks the block whose output is the context, after the final LayerNorm when
    `final_norm` (SD 1.x and 2.x; SDXL takes the block's output as it is). `pad_with_eot` fills
    the positions after end-of-text with its id 49407 (how SD 1.x was trained) instead of 0 (SD 2.x).
    `output_dim` adds the CLIP head (`text_projection` (width, output_dim) and a scalar
    `logit_scale`): SDXL's pooled text comes out of it; SD 2.x checkpoints carry it unused, so it
    exists for them only so that they load strictly. None: no head (SD 1.x).
    """

    width: int
    layers: int
    heads: int
    vocab_size: int = _CLIP_VOCAB_SIZE
    context_length: int = 77
    act: Literal["gelu", "quick_gelu"] = "gelu"
    layer: Literal["last", "penultimate"] = "last"
    pad_with_eot: bool = False
    output_dim: int | None = None
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {self.layer!r}")
        if self.layers < (2 if self.layer == "penultimate" else 1):
            raise ValueError(f"layer={self.layer!r} needs more than {self.layers} layers")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.vocab_size < _CLIP_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {_CLIP_VOCAB_SIZE} (the CLIP tokenizer)")
        if self.context_length < 2:
            raise ValueError("context_length must leave room for the start and end tokens (>= 2)")


def sd1() -> TextEncoderConfig:
    """OpenAI CLIP ViT-L/14 text model, as in Stable Diffusion 1.x."""
    return TextEncoderConfig(
        width=768, layers=12, heads=12, act="quick_gelu", layer="last", pad_with_eot=True
    )


def sd2() -> TextEncoderConfig:
    """OpenCLIP ViT-H/14 text tower, as in Stable Diffusion 2.x."""
    return TextEncoderConfig(
        width=1024, layers=24, heads=16, act="gelu", layer="penultimate", output_dim=1024
    )


def sdxl_clip_l() -> TextEncoderConfig:
    """SDXL's first tower: SD 1.x's CLIP ViT-L/14, its penultimate block without the final LayerNorm."""
    return TextEncoderConfig(width=768, layers=12, heads=12, act="quick_gelu", layer="penultimate",
                             pad_with_eot=True, final_norm=False)


def sdxl_bigg() -> TextEncoderConfig:
    """SDXL's OpenCLIP ViT-bigG/14 (the refiner's only tower): penultimate block without the final LayerNorm,
    and the pooled, projected text."""
    return TextEncoderConfig(width=1280, layers=32, heads=20, act="gelu", layer="penultimate", output_dim=1280,
                             final_norm=False)


def tiny() -> TextEncoderConfig:
    """A small tower for tests and the bundled shapes model."""
    return TextEncoderConfig(width=64, layers=2, heads=4)


PRESETS = {"sd1": sd1, "sd2": sd2, "sdxl_clip_l": sdxl_clip_l, "sdxl_bigg": sdxl_bigg, "tiny": tiny}


class TextEncoder(TextTransformer):
    """Frozen CLIP text transformer mapping prompts to context (B, context_length, width).

    It subclasses open_clip's `TextTransformer` rather than wrapping it so that `state_dict()`
    keys are exactly the tower's (`token_embedding.weight`, `transformer.resblocks.N...`,
    `ln_final.weight`, ...): an SD 2.x `cond_stage_model.model.*` sub-dict, prefix removed,
    loads with `strict=True`. The causal mask is a non-persistent buffer, so it never appears
    in checkpoints; loading remakes it, so building on the meta device is safe.

    SD 1.x has no `text_projection`, so `sd1()` builds the tower without a head instead of
    carrying random projection weights that strict loading would then demand; load its weights
    through `hf_clip_text_to_open_clip`. Parameters are frozen (`requires_grad_(False)`) and the
    module starts in eval mode; `train()` behaves as on any module.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.width,
            heads=config.heads,
            layers=config.layers,
            output_dim=config.output_dim,
            act_layer=QuickGELU if config.act == "quick_gelu" else nn.GELU,
        )
        if config.output_dim is not None:
            # open_clip's CLIP keeps its temperature beside the text tower; SD 2.x saved it.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.config = config
        self.token_embedding = TokenEmbedding(self.token_embedding.weight)
        self.tokenizer = open_clip.SimpleTokenizer()
        self.set_embeddings({})  # none yet; `embeddings` maps trigger words to their token ids
        # Index of the block whose output becomes the context; later blocks are never run.
        self._output_block = config.layers - (1 if config.layer == "last" else 2)
        self.register_load_state_dict_post_hook(_after_loading)
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Prompts -> token ids (B, context_length) int64 on the CPU.

        Each row is start-of-text 49406, the BPE ids, end-of-text 49407, then padding: 49407
        when `pad_with_eot` (SD 1.x), else 0 (SD 2.x). A prompt too long for the context warns
        with the dropped text and is cut so that end-of-text stays last.
        """
        if isinstance(prompts, str):
            raise ValueError("tokenize takes a list of prompts; wrap a single prompt as [prompt]")
        tok = self.tokenizer
        num_fit = self.config.context_length - 2  # room left by the start and end tokens
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self.encode_text(prompt)
            if len(ids) > num_fit:
                dropped = ids[num_fit:]
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens but only {num_fit} fit: cut "
                    f"{len(dropped)} tokens: {excerpt(tok.decode(dropped).strip())}",
                    stacklevel=2,
                )
                ids = ids[:num_fit]
            rows.append(self.token_row(ids))
        return torch.stack(rows) if rows else torch.empty(0, self.config.context_length, dtype=torch.long)

    def encode_text(self, text: str) -> list[int]:
        """BPE ids of `text` (no start / end tokens), each textual-inversion trigger word replaced by the
        ids of its vectors."""
        if not self.embeddings:
            return self.tokenizer.encode(text)
        ids = []
        for k, piece in enumerate(self._triggers.split(text)):
            ids += self.embeddings[piece] if k % 2 else self.tokenizer.encode(piece)
        return ids

    def trigger_words(self, text: str) -> set[str]:
        """The textual-inversion trigger words in `text`."""
        return set(self._triggers.findall(text)) if self.embeddings else set()

    def set_embeddings(self, embeddings: dict[str, Tensor]) -> None:
        """Textual-inversion vectors (n, width) by trigger word; replaces earlier ones. Words are matched
        whole and case-sensitively, as AUTOMATIC1111 does; longer words win over their prefixes."""
        self.token_embedding.set_extra(list(embeddings.values()))
        self.embeddings: dict[str, list[int]] = {}  # trigger word -> its ids, from vocab_size on
        next_id = self.config.vocab_size
        for word, vectors in embeddings.items():
            self.embeddings[word] = list(range(next_id, next_id + len(vectors)))
            next_id += len(vectors)
        words = sorted(self.embeddings, key=len, reverse=True)
        self._triggers = re.compile(r"(?<![\w])(" + "|".join(map(re.escape, words)) + r")(?![\w])")

    def token_row(self, ids: Sequence[int]) -> Tensor:
        """BPE ids (at most context_length - 2) -> one row (context_length,) int64: start-of-text,
        the ids, end-of-text, then the padding of `tokenize`."""
        if len(ids) > self.config.context_length - 2:
            raise ValueError(f"{len(ids)} ids do not fit in a row of {self.config.context_length} tokens")
        tok = self.tokenizer
        pad = tok.eot_token_id if self.config.pad_with_eot else 0
        row = torch.full((self.config.context_length,), pad, dtype=torch.long)
        row[: len(ids) + 2] = torch.tensor([tok.sot_token_id, *ids, tok.eot_token_id])
        return row

    def encode_tokens(self, tokens: Tensor, clip_skip: int | None = None) -> Tensor:
        """Token ids (B, context_length) -> context (B, context_length, width).

        `clip_skip` N takes the output of the N-th block from the end (1 = last, as AUTOMATIC1111 and
        ComfyUI count) instead of the config's `layer`; the final LayerNorm follows when the config says
        so. The context is on the weights' device and in their dtype.
        """
        return self._encode(tokens, clip_skip, pooled=False)[0]

    def encode_tokens_pooled(self, tokens: Tensor, clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """`encode_tokens`, and the pooled text (B, output_dim): the last block's output at end-of-text,
        after the final LayerNorm, through `text_projection` (what CLIP matches to images; SDXL's vector)."""
        if self.text_projection is None:
            raise ValueError("this text encoder has no text_projection (output_dim None), so no pooled output")
        return self._encode(tokens, clip_skip, pooled=True)

    def _encode(self, tokens: Tensor, clip_skip: int | None, pooled: bool) -> tuple[Tensor, Tensor | None]:
        if tokens.ndim != 2 or tokens.shape[1] != self.config.context_length:
            raise ValueError(
                f"tokens must be (B, {self.config.context_length}), got {tuple(tokens.shape)}; "
                "make them with tokenize()"
            )
        if clip_skip is not None and not 1 <= clip_skip <= self.config.layers:
            raise InputError(f"clip skip must be in [1, {self.config.layers}] for this text encoder "
                             f"({self.config.layers} layers), got {clip_skip}")
        tokens = tokens.to(self.token_embedding.weight.device)
        block = self._output_block if clip_skip is None else self.config.layers - clip_skip
        last = self.config.layers - 1
        out = self.forward_intermediates(tokens, indices=sorted({block, last} if pooled else {block}), stop_early=True,
                                         intermediates_only=True, output_fmt="NLC")["text_intermediates"]
        context = self.ln_final(out[0]) if self.config.final_norm else out[0]
        if not pooled:
            return context, None
        # End-of-text is the first 49407 of a row; not its largest id, since textual-inversion ids lie above it.
        eot = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1)
        final = self.ln_final(out[-1][torch.arange(len(tokens), device=tokens.device), eot])
        return context, final @ self.text_projection

    def forward(self, prompts: list[str] | Tensor) -> Tensor:
        """Prompts (or token ids (B, context_length)) -> context (B, context_length, width)."""
        tokens = prompts if isinstance(prompts, Tensor) else self.tokenize(prompts)
        return self.encode_tokens(tokens)


class TokenEmbedding(nn.Embedding):
    """CLIP's token embedding, and after it the rows of textual-inversion vectors (ids from `vocab_size`
    on). Those are a non-persistent buffer: never in the state dict, so saving and strict loading see
    the checkpoint's weights only."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__(*weight.shape, _weight=weight, device=weight.device)
        self.register_buffer("extra", weight.new_zeros(0, weight.shape[1]), persistent=False)

    def set_extra(self, vectors: list[Tensor]) -> None:
        weight = self.weight
        rows = torch.cat(vectors) if vectors else weight.new_zeros(0, weight.shape[1])
        self.extra = rows.to(weight.device, weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        if not len(self.extra):
            return super().forward(ids)
        extra = ids >= self.num_embeddings
        out = super().forward(ids.masked_fill(extra, 0))
        out[extra] = self.extra[ids[extra] - self.num_embeddings].to(out.dtype)
        return out


def _after_loading(encoder: TextEncoder, incompatible_keys: object) -> None:
    # The mask and the embedding rows are never saved: remake them where the weights landed, since
    # building on the meta device and then loading (assign=True, or after to_empty) leaves them empty
    # or garbage. New weights drop the textual-inversion vectors made for the old ones.
    encoder.attn_mask = encoder.build_causal_mask().to(encoder.token_embedding.weight.device)
    encoder.set_embeddings({})


# Hugging Face CLIPTextModel (transformers 4.x, as saved in SD 1.x) -> open_clip names.
_HF_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_BLOCK_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj")
_OPEN_CLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")
# A buffer of 0..76 that older transformers saved with the weights; it carries no information.
_HF_POSITION_IDS = "text_model.embeddings.position_ids"


def hf_clip_text_to_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face CLIPTextModel state dict to the open_clip layout of `TextEncoder`.

    Takes the keys of an SD 1.x checkpoint under `cond_stage_model.transformer.` with that prefix
    removed (they start with `text_model.`). Separate q/k/v projections are concatenated, in
    that order, into `attn.in_proj_weight` / `in_proj_bias`; `position_ids` is dropped.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (block, weight|bias) -> {"q": ...}
    for key, value in state_dict.items():
        if key == _HF_POSITION_IDS:
            continue
        if key in _HF_TOP_LEVEL:
            out[_HF_TOP_LEVEL[key]] = value
            continue
        match = _HF_BLOCK_KEY.fullmatch(key)
        if match is None:
            raise _unexpected_hf_key(key)
        block, name, kind = match.groups()
        qkv_match = _HF_QKV.fullmatch(name)
        if name in _HF_BLOCK:
            out[f"transformer.resblocks.{block}.{_HF_BLOCK[name]}.{kind}"] = value
        elif qkv_match is not None:
            qkv.setdefault((block, kind), {})[qkv_match.group(1)] = value
        else:
            raise _unexpected_hf_key(key)
    for (block, kind), parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise ValueError(
                f"layer {block} has self_attn {kind}s for only {sorted(parts)} of q, k, v: "
                "the state dict is incomplete"
            )
        merged = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{block}.attn.in_proj_{kind}"] = merged
    return out


def open_clip_to_hf_clip_text(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `hf_clip_text_to_open_clip`: a `TextEncoder` state dict in the Hugging Face
    CLIPTextModel layout (keys start with `text_model.`, as an SD 1.x checkpoint stores them under
    `cond_stage_model.transformer.`). The fused `attn.in_proj_*` are split into q, k, v in that order."""
    top_level = {ours: theirs for theirs, ours in _HF_TOP_LEVEL.items()}
    block_names = {ours: theirs for theirs, ours in _HF_BLOCK.items()}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in top_level:
            out[top_level[key]] = value
            continue
        match = _OPEN_CLIP_BLOCK_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} for an SD 1.x text encoder (no Hugging Face name)")
        block, name, kind = match.groups()
        theirs = f"text_model.encoder.layers.{block}"
        if name == "attn.in_proj":
            for projection, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{theirs}.self_attn.{projection}_proj.{kind}"] = part.contiguous()
        elif name in block_names:
            out[f"{theirs}.{block_names[name]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} for an SD 1.x text encoder (no Hugging Face name)")
    return out


def _unexpected_hf_key(key: str) -> ValueError:
    return ValueError(
        f"unexpected key {key!r} for a CLIP text model: pass the SD 1.x keys under "
        "'cond_stage_model.transformer.' with that prefix removed"
    )
