"""SDXL's conditioning: text towers side by side as the context, pooled text and image sizes as a vector.

The base model encodes a prompt with CLIP ViT-L/14 (768 wide) and OpenCLIP ViT-bigG/14 (1280 wide):
their penultimate blocks' outputs, without the final LayerNorm, are concatenated along channels into
the cross-attention context (B, 77k, 2048). Its vector input (B, 2816) is bigG's pooled, projected
text (1280) followed by 256-wide sinusoidal embeddings of six numbers: the original size (height,
width), the crop's top-left corner (top, left) and the target size (height, width) that training
images were tagged with. The refiner has bigG alone (context 1280) and embeds an aesthetic score in
place of the target size (vector 2560).

Module names mirror the checkpoint's `conditioner.embedders.N.*`; each embedder is a `TextEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldm.errors import InputError
from ldm.nn import timestep_embedding
from ldm.prompts import count_chunks, encode_prompts_pooled
from ldm.text_encoder import TextEncoder, TextEncoderConfig

SIZE_EMBEDDING_DIM = 256  # width of each micro-conditioning number's embedding (the YAMLs' `outdim`)
# The numbers after the pooled text, in the order the vector holds them.
BASE_MICRO_CONDITIONING = ("original_size", "crop_coords", "target_size")
REFINER_MICRO_CONDITIONING = ("original_size", "crop_coords", "aesthetic_score")


class Conditioner(nn.Module):
    """SDXL's text towers: prompts -> context (B, 77k, sum of widths) and pooled text (B, output_dim).

    The last embedder carries the projection head that gives the pooled text (bigG). Frozen, like
    `TextEncoder`.
    """

    def __init__(self, configs: Sequence[TextEncoderConfig]) -> None:
        super().__init__()
        if not configs or configs[-1].output_dim is None:
            raise ValueError("the last text encoder of an SDXL conditioner needs a text_projection (output_dim)")
        self.embedders = nn.ModuleList(TextEncoder(config) for config in configs)

    @property
    def width(self) -> int:
        """The context's width: the embedders' widths added."""
        return sum(embedder.config.width for embedder in self.embedders)

    @property
    def pooled_width(self) -> int:
        return self.embedders[-1].config.output_dim

    def trigger_words(self, text: str) -> set[str]:
        """The textual-inversion trigger words in `text`, of any tower."""
        return set().union(*(embedder.trigger_words(text) for embedder in self.embedders))

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, clip_skip: int | None = None
               ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """(context, pooled) of the prompts and, unless `negative_prompts` is None, of those.

        Prompt weights and long prompts work as in `ldm.prompts`, in each tower; every tower encodes as
        many chunks as the longest prompt needs in any of them, so their contexts line up.
        """
        texts = [*prompts, *(negative_prompts or [])]
        num_chunks = max(count_chunks(embedder, texts) for embedder in self.embedders)
        encoded = [encode_prompts_pooled(embedder, prompts, negative_prompts, clip_skip,
                                         pooled=embedder is self.embedders[-1], num_chunks=num_chunks)
                   for embedder in self.embedders]

        def joined(side: int) -> tuple[Tensor, Tensor]:
            contexts = [tower[side][0] for tower in encoded]
            return torch.cat(contexts, dim=-1), encoded[-1][side][1]

        return joined(0), None if negative_prompts is None else joined(1)


def micro_conditioning(names: Sequence[str], values: dict[str, Sequence[float]], batch_size: int) -> Tensor:
    """The embedded numbers of `names` (BASE_ or REFINER_MICRO_CONDITIONING), each value a tuple of
    numbers, -> (batch_size, 256 * count) float32: each number's cosine-first sinusoidal embedding, as
    for timesteps, in the order given."""
    numbers = torch.tensor([float(x) for name in names for x in values[name]], dtype=torch.float32)
    embedded = timestep_embedding(numbers, SIZE_EMBEDDING_DIM).flatten()
    return embedded.expand(batch_size, -1)


def check_vector_width(adm_in_channels: int, pooled_width: int, names: Sequence[str]) -> None:
    """InputError unless a U-Net's vector input is the pooled text and the embeddings of `names`."""
    count = sum(2 if name != "aesthetic_score" else 1 for name in names)
    expected = pooled_width + SIZE_EMBEDDING_DIM * count
    if adm_in_channels != expected:
        raise InputError(f"the U-Net's vector input is {adm_in_channels} wide, but pooled text ({pooled_width}) "
                         f"and {count} size embeddings of {SIZE_EMBEDDING_DIM} make {expected}: not an SDXL "
                         "base or refiner layout")
