"""Tests for ldm.text_encoder: tokenization, context, and the SD 1.x / 2.x weight layouts."""

from __future__ import annotations

import dataclasses
import re
import warnings

import open_clip
import pytest
import torch
import transformers
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ldm.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    hf_clip_text_to_open_clip,
    sd1,
    sd2,
    tiny,
)

SOT, EOT = 49406, 49407
PROMPTS = ["a photo of a cat", "a small red circle in the top left on a black background"]


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter, so LayerNorms are not the identity and a misplaced key shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)


def _hf_text_model(width: int, layers: int, heads: int) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    model = transformers.CLIPTextModel(config).eval()
    _perturb_(model, seed=0)
    return model


def _sd1_state_dict(model: transformers.CLIPTextModel) -> dict[str, torch.Tensor]:
    """The model's weights as SD 1.x checkpoints store them under cond_stage_model.transformer."""
    # transformers >= 5 dropped the `text_model.` level that checkpoints saved with 4.x carry.
    state_dict = {
        key if key.startswith("text_model.") else f"text_model.{key}": value
        for key, value in model.state_dict().items()
    }
    state_dict["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state_dict


def _meta_encoder(config: TextEncoderConfig) -> TextEncoder:
    """A full-size encoder without weights, enough for tokenizing and listing keys."""
    with torch.device("meta"):
        return TextEncoder(config)


def test_tokenize_gives_known_clip_ids_and_round_trips():
    tokens = _meta_encoder(sd1()).tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    # The ids of this prompt in the CLIP BPE vocabulary, as printed in the CLIP / transformers docs.
    assert tokens[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    decoded = open_clip.SimpleTokenizer().decode(tokens[0, 1:6].tolist())
    assert decoded.strip() == "a photo of a cat"


def test_padding_follows_each_family():
    prompts = [*PROMPTS, ""]
    reference = open_clip.tokenize(prompts)  # open_clip's own: zero padding, as SD 2.x was trained
    assert torch.equal(_meta_encoder(sd2()).tokenize(prompts), reference)

    sd1_tokens = _meta_encoder(sd1()).tokenize(prompts)
    for row, ref_row in zip(sd1_tokens, reference, strict=True):
        end = ref_row.tolist().index(EOT)
        assert torch.equal(row[: end + 1], ref_row[: end + 1])
        assert (row[end + 1 :] == EOT).all()  # SD 1.x: end-of-text fills the rest
    assert sd1_tokens[2, :2].tolist() == [SOT, EOT]


def test_a_10000_character_caption_warns_in_a_short_line():
    with pytest.warns(UserWarning) as record:
        TextEncoder(tiny()).tokenize(["a red circle " * 770])
    message = str(record[0].message)
    assert len(message) < 200 and message.endswith("characters)"), message


def test_long_prompt_warns_with_the_cut_text_and_keeps_eot_last():
    encoder = _meta_encoder(sd1())
    cut = "purple triangle orange square"
    num_cut = len(open_clip.SimpleTokenizer().encode(cut))
    prompt = "cat " * 75 + cut  # "cat" is one token: exactly 75 fit between start and end
    with pytest.warns(UserWarning, match=re.escape(f"cut {num_cut} tokens: '{cut}'")):
        tokens = encoder.tokenize([prompt])
    assert tokens[0].tolist() == [SOT, *[2368] * 75, EOT]
    assert torch.equal(tokens, open_clip.tokenize([prompt]))  # same truncation as open_clip's

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.tokenize(PROMPTS)


def test_bad_input_raises_value_error():
    encoder = _meta_encoder(tiny())
    with pytest.raises(ValueError, match="list of prompts"):
        encoder.tokenize("a cat")
    with pytest.raises(ValueError, match="tokenize"):
        encoder.encode_tokens(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="penultimate"):
        TextEncoderConfig(width=64, layers=1, heads=4, layer="penultimate")
    with pytest.raises(ValueError, match="act"):
        TextEncoderConfig(width=64, layers=2, heads=4, act="relu")


def test_context_shape_dtype_and_frozen():
    torch.manual_seed(0)
    encoder = TextEncoder(tiny())
    context = encoder(PROMPTS)
    assert context.shape == (2, 77, 64) and context.dtype == torch.float32
    assert not context.requires_grad
    assert not any(p.requires_grad for p in encoder.parameters())
    assert torch.equal(encoder(encoder.tokenize(PROMPTS)), context)

    context64 = encoder.to(torch.float64)(PROMPTS)
    assert context64.dtype == torch.float64
    torch.testing.assert_close(context64.float(), context, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("assign", [True, False], ids=["assign", "to_empty"])
def test_building_on_meta_then_loading_gives_the_same_context(assign):
    torch.manual_seed(0)
    reference = TextEncoder(tiny())
    encoder = _meta_encoder(tiny())
    if not assign:
        encoder.to_empty(device="cpu")
    encoder.load_state_dict(reference.state_dict(), strict=True, assign=assign)
    assert torch.equal(encoder(PROMPTS), reference(PROMPTS))


def _tiny_open_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(width=64, heads=4, layers=3),
    ).eval()
    _perturb_(model, seed=1)
    return model


def test_sd2_weights_load_strict_and_penultimate_matches_reference():
    clip = _tiny_open_clip()
    # What SD 2.x saves as cond_stage_model.model: the CLIP model with its vision tower deleted.
    text_state = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    config = TextEncoderConfig(width=64, layers=3, heads=4, layer="penultimate", output_dim=32)
    penultimate = TextEncoder(config)
    penultimate.load_state_dict(text_state, strict=True)
    last = TextEncoder(dataclasses.replace(config, layer="last"))
    last.load_state_dict(text_state, strict=True)

    tokens = penultimate.tokenize(PROMPTS)
    # Reference: run the blocks one by one, as Stability's FrozenOpenCLIPEmbedder does.
    with torch.no_grad():
        x = clip.token_embedding(tokens) + clip.positional_embedding
        hidden = []
        for block in clip.transformer.resblocks:
            x = block(x, attn_mask=clip.attn_mask)
            hidden.append(clip.ln_final(x))
    torch.testing.assert_close(penultimate(tokens), hidden[-2], rtol=0, atol=1e-5)
    torch.testing.assert_close(last(tokens), hidden[-1], rtol=0, atol=1e-5)
    assert (hidden[-1] - hidden[-2]).abs().max() > 0.1


def test_sd2_state_dict_keys_match_open_clip_vit_h14_text_tower():
    with torch.device("meta"):
        clip = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    expected = {k: v.shape for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    ours = {k: v.shape for k, v in _meta_encoder(sd2()).state_dict().items()}
    assert ours == expected
    assert expected["transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert expected["text_projection"] == (1024, 1024) and expected["logit_scale"] == ()


@pytest.mark.parametrize(
    ("width", "layers", "heads"),
    [
        pytest.param(64, 2, 4, id="tiny"),
        pytest.param(768, 12, 12, id="sd1-size", marks=pytest.mark.slow),  # about 7 s on CPU
    ],
)
def test_sd1_hf_weights_reproduce_hf_output(width, layers, heads):
    torch.manual_seed(0)
    hf = _hf_text_model(width, layers, heads)
    encoder = TextEncoder(dataclasses.replace(sd1(), width=width, layers=layers, heads=heads))
    encoder.load_state_dict(hf_clip_text_to_open_clip(_sd1_state_dict(hf)), strict=True)

    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = hf(input_ids=tokens).last_hidden_state
    error = (encoder.encode_tokens(tokens) - expected).abs().max()
    assert error <= 1e-4 * expected.abs().max()


def test_hf_mapping_rejects_unknown_and_incomplete_keys():
    state_dict = _sd1_state_dict(_hf_text_model(64, 2, 4))
    with pytest.raises(ValueError, match="unexpected key"):
        hf_clip_text_to_open_clip({**state_dict, "text_model.encoder.layers.0.rope.weight": None})
    prefixed = {f"cond_stage_model.transformer.{k}": v for k, v in state_dict.items()}
    with pytest.raises(ValueError, match="prefix removed"):
        hf_clip_text_to_open_clip(prefixed)
    del state_dict["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="layer 1"):
        hf_clip_text_to_open_clip(state_dict)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_is_that_hidden_state_through_the_final_layer_norm(clip_skip):
    """AUTOMATIC1111's CLIP skip N: Hugging Face's hidden_states[-N] (the N-th block output from the end),
    then the final LayerNorm."""
    torch.manual_seed(0)
    hf = _hf_text_model(64, 3, 4)
    encoder = TextEncoder(dataclasses.replace(sd1(), width=64, layers=3, heads=4))
    encoder.load_state_dict(hf_clip_text_to_open_clip(_sd1_state_dict(hf)), strict=True)
    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        hidden = hf(input_ids=tokens, output_hidden_states=True).hidden_states[-clip_skip]
        text_model = getattr(hf, "text_model", hf)
        expected = text_model.final_layer_norm(hidden)
        context = encoder.encode_tokens(tokens, clip_skip)
    assert (context - expected).abs().max() <= 1e-4 * expected.abs().max()
    with pytest.raises(ValueError, match=r"clip skip must be in \[1, 3\]"):
        encoder.encode_tokens(tokens, 4)
