"""Prompts -> context: `(text:1.3)` weights and prompts longer than the text encoder's context.

Weights: `(text:w)` multiplies the context vectors of the tokens of `text` by `w`; groups nest
and their weights multiply, `\\(` `\\)` `\\\\` are literal characters, and a group without a
trailing `:number` stays literal text with its parentheses. After weighting, each chunk's
context is rescaled so that its mean over all positions and channels is what it was before
(the convention of the AUTOMATIC1111 web UI), which keeps the overall magnitude the U-Net saw
in training.

Length: the token ids of a prompt are split into chunks of `context_length - 2`, each chunk is
wrapped in start and end tokens and encoded alone, and the contexts are concatenated along the
sequence axis: a prompt of k chunks gives a context (k * context_length, width). Nothing is
cut. Prompts encoded together are padded with empty chunks (the encoding of "") to the longest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.errors import InputError
from ldm.text_encoder import TextEncoder

# Escaped character | "(" | ")" | plain text.
_PIECE = re.compile(r"\\(.)|(\()|(\))|([^\\()]+|\\)", re.DOTALL)
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, neighbours of equal weight merged.

    `"a (red:1.5) circle"` -> `[("a ", 1.0), ("red", 1.5), (" circle", 1.0)]`; a prompt without
    weighted groups is one piece, its text unchanged (escapes aside).
    """
    # Each open group: the pieces finished inside it, and the plain text since its last inner group
    # (where a trailing ":number" is its weight).
    stack: list[tuple[list[tuple[str, float]], list[str]]] = [([], [])]
    for match in _PIECE.finditer(prompt):
        escaped, open_paren, close_paren, text = match.groups()
        pieces, tail = stack[-1]
        if open_paren:
            stack.append(([], []))
        elif close_paren:
            if len(stack) == 1:
                raise InputError(f"prompt has an unmatched ')' at character {match.start() + 1}: {prompt!r} "
                                 "(write \\) for a literal parenthesis)")
            stack.pop()
            outer_pieces, outer_tail = stack[-1]
            outer_pieces.append(("".join(outer_tail), 1.0))
            outer_tail.clear()
            text = "".join(tail)
            weight = _WEIGHT.search(text)
            if weight is None:
                outer_pieces.extend([("(", 1.0), *pieces, (text + ")", 1.0)])
            else:
                scale = float(weight.group(1))
                outer_pieces.extend((t, w * scale) for t, w in [*pieces, (text[: weight.start()], 1.0)])
        else:
            tail.append(escaped if escaped is not None else text)
    if len(stack) > 1:
        raise InputError(f"prompt has {len(stack) - 1} unclosed '(': {prompt!r} "
                         "(close it, or write \\( for a literal parenthesis)")
    pieces, tail = stack[0]
    pieces.append(("".join(tail), 1.0))
    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def tokenize_weighted(text_encoder: TextEncoder, prompt: str) -> tuple[list[int], list[float]]:
    """BPE ids of a prompt (no start/end tokens) and the weight of each id."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_weights(prompt):
        piece = text_encoder.encode_text(text)
        ids += piece
        weights += [weight] * len(piece)
    return ids, weights


def _chunks(text_encoder: TextEncoder, prompt: str) -> tuple[Tensor, Tensor]:
    """A prompt -> token rows (k, context_length) int64 and their weights (k, context_length)."""
    ids, weights = tokenize_weighted(text_encoder, prompt)
    size = text_encoder.config.context_length - 2
    rows, row_weights = [], []
    for start in range(0, max(len(ids), 1), size):
        chunk = ids[start: start + size]
        rows.append(text_encoder.token_row(chunk))
        # Start, end and padding tokens keep weight 1.
        chunk_weights = torch.ones(text_encoder.config.context_length, dtype=torch.float64)
        chunk_weights[1: len(chunk) + 1] = torch.tensor(weights[start: start + size], dtype=torch.float64)
        row_weights.append(chunk_weights)
    return torch.stack(rows), torch.stack(row_weights)


def encode_prompts(text_encoder: TextEncoder, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                   clip_skip: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Contexts of prompts and of their negative prompts, each (B, k * context_length, width).

    k is the most chunks of any of the prompts and negative prompts; shorter ones are padded with
    empty chunks, so that classifier-free guidance can batch the two. `negative_prompts` None
    gives no unconditional context (None). `clip_skip` as in `TextEncoder.encode_tokens`. On the encoder's
    device and in its dtype.
    """
    (context, _), negative = encode_prompts_pooled(text_encoder, prompts, negative_prompts, clip_skip, pooled=False)
    return context, None if negative is None else negative[0]


Encoded = tuple[Tensor, Tensor | None]  # context (B, k * context_length, width), pooled text (B, output_dim)


def encode_prompts_pooled(text_encoder: TextEncoder, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
                          clip_skip: int | None = None, pooled: bool = True, num_chunks: int = 1
                          ) -> tuple[Encoded, Encoded | None]:
    """`encode_prompts`, each context with the pooled text of its prompt's first chunk (as AUTOMATIC1111
    pools long prompts for SDXL); pooled is None unless `pooled`. At least `num_chunks` chunks are encoded,
    so that two encoders of one model can be made to give contexts of the same length."""
    if isinstance(prompts, str) or isinstance(negative_prompts, str):
        raise ValueError("encode_prompts takes lists of prompts; wrap a single prompt as [prompt]")
    chunked = [_chunks(text_encoder, prompt) for prompt in prompts]
    negative_chunked = [_chunks(text_encoder, prompt) for prompt in negative_prompts or []]
    k = max((len(tokens) for tokens, _ in chunked + negative_chunked), default=1)
    k = max(k, num_chunks)
    encoded = _encode_chunks(text_encoder, chunked, k, clip_skip, pooled)
    if negative_prompts is None:
        return encoded, None
    return encoded, _encode_chunks(text_encoder, negative_chunked, k, clip_skip, pooled)


def count_chunks(text_encoder: TextEncoder, prompts: Sequence[str]) -> int:
    """The most chunks any of `prompts` takes."""
    return max((len(_chunks(text_encoder, prompt)[0]) for prompt in prompts), default=1)


def _encode_chunks(text_encoder: TextEncoder, chunked: list[tuple[Tensor, Tensor]], k: int,
                   clip_skip: int | None, pooled: bool) -> Encoded:
    """Pad each prompt's chunks to k with empty ones, encode all in one batch, weight, concatenate."""
    empty_tokens, empty_weights = _chunks(text_encoder, "")
    tokens = torch.stack([torch.cat([t, *[empty_tokens] * (k - len(t))]) for t, _ in chunked])
    weights = torch.stack([torch.cat([w, *[empty_weights] * (k - len(w))]) for _, w in chunked])
    batch_size, length = len(chunked), text_encoder.config.context_length
    tokens = tokens.view(batch_size * k, length)
    if pooled:
        context, pooled_text = text_encoder.encode_tokens_pooled(tokens, clip_skip)
        pooled_text = pooled_text.view(batch_size, k, -1)[:, 0]
    else:
        context, pooled_text = text_encoder.encode_tokens(tokens, clip_skip), None
    context = apply_weights(context, weights.view(batch_size * k, length))
    return context.reshape(batch_size, k * length, -1), pooled_text


def apply_weights(context: Tensor, weights: Tensor) -> Tensor:
    """Multiply context (N, L, D) by per-token weights (N, L) and restore each row's mean.

    Rows whose weights are all 1 are returned unchanged. A weighted row whose mean is zero up to
    rounding (e.g. an untrained final LayerNorm) has no mean to restore and is only multiplied.
    """
    weighted_rows = (weights != 1).any(dim=1)
    if not weighted_rows.any():
        return context
    weights = weights.to(context.device, context.dtype).unsqueeze(-1)
    weighted = context * weights
    original_mean = context.mean(dim=(1, 2), keepdim=True)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    rounding = torch.finfo(context.dtype).eps ** 0.5 * weighted.abs().mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(new_mean.abs() > rounding, original_mean / new_mean, torch.ones_like(new_mean))
    weighted = weighted * ratio
    return torch.where(weighted_rows.to(context.device).view(-1, 1, 1), weighted, context)
