"""LoRA / LyCORIS files: layer names against diffusers' conversion, merged weights against diffusers and PEFT
on the same random weights, load / unload, prompt tags, and bad files."""

from __future__ import annotations

import copy
import pickle
import re
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldm.cli import run_main
from ldm.errors import InputError
from ldm.layer_names import diffusers_unet_names, flat
from ldm.lora import merged_weight, split_lora_tags
from ldm.pipeline import Pipeline
from ldm.sd_checkpoint import join_state_dicts
from ldm.unet import UNetConfig
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402
from benchmark import diffusers_text_encoder, diffusers_unet, original_config  # noqa: E402

# SD 1.x's U-Net shape (convolution projections, heads by count) and SD 2.x's (linear projections, heads
# by width), both tiny.
UNETS = {
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                      num_heads=4, context_dim=64),
    "sd2": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=2,
                      num_heads=-1, num_head_channels=8, use_linear_in_transformer=True, context_dim=64),
}
PROMPTS = ["a red circle", "two blue squares on white"]


def _pipeline(layout: str = "sd1") -> Pipeline:
    spec = tiny_spec()
    spec.unet = UNETS[layout]
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(spec, name="tiny")
    randomize_(pipe.unet, seed=1)
    randomize_(pipe.text_encoder, seed=2, std=0.1)
    return pipe


def _low_rank(weight: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) of a LoRA for `weight`: down (rank, in[, kh, kw]), up (out, rank[, 1, 1])."""
    down = 0.2 * torch.randn(rank, *weight.shape[1:], generator=generator)
    up = 0.2 * torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=generator)
    return down, up


def kohya_lora(pipe: Pipeline, seed: int, rank: int = 4, alpha: float = 2.0, text: bool = True) -> dict:
    """A kohya LoRA (+ LoCon) on every linear and convolution of the U-Net (diffusers names) and every linear of
    the text encoder (Hugging Face names), as kohya's sd-scripts writes for SD 1.x / 2.x."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    names = diffusers_unet_names(pipe.unet)
    layers = [(f"lora_unet_{flat(names[n])}", m.weight) for n, m in pipe.unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))]
    if text:
        width = pipe.text_encoder.config.width
        for block in range(pipe.text_encoder.config.layers):
            ours, theirs = f"transformer.resblocks.{block}", f"lora_te_text_model_encoder_layers_{block}"
            fused = pipe.text_encoder.get_parameter(f"{ours}.attn.in_proj_weight")
            layers += [(f"{theirs}_self_attn_{p}_proj", fused[k * width:(k + 1) * width]) for k, p in enumerate("qkv")]
            layers += [(f"{theirs}_{hf}", pipe.text_encoder.get_parameter(f"{ours}.{name}.weight"))
                       for hf, name in (("self_attn_out_proj", "attn.out_proj"), ("mlp_fc1", "mlp.c_fc"),
                                        ("mlp_fc2", "mlp.c_proj"))]
    for key, weight in layers:
        down, up = _low_rank(weight, rank, generator)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    return tensors


def kernel_convs(pipe: Pipeline) -> list[tuple[str, nn.Conv2d]]:
    """The U-Net's k x k convolutions (k > 1), by diffusers name: the layers Tucker forms are for."""
    return [(theirs, module) for ours, theirs in diffusers_unet_names(pipe.unet).items()
            if isinstance(module := pipe.unet.get_submodule(ours), nn.Conv2d) and module.kernel_size != (1, 1)]


def locon_tucker(pipe: Pipeline, seed: int, rank: int = 3, alpha: float = 2.0) -> dict:
    """A LyCORIS LoCon with Tucker-decomposed convolutions (`lora_mid`) on the U-Net's k x k convolutions."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for name, conv in kernel_convs(pipe):
        key = f"lora_unet_{flat(name)}"
        tensors |= {f"{key}.lora_down.weight": 0.3 * torch.randn(rank, conv.in_channels, 1, 1, generator=generator),
                    f"{key}.lora_mid.weight": 0.3 * torch.randn(rank, rank, *conv.kernel_size, generator=generator),
                    f"{key}.lora_up.weight": 0.3 * torch.randn(conv.out_channels, rank, 1, 1, generator=generator),
                    f"{key}.alpha": torch.tensor(alpha)}
    return tensors


def write(tensors: dict, path: Path) -> Path:
    save_file(tensors, str(path))
    return path


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def unet_output(unet, diffusers: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([900, 10])
    context = torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        return unet(x_t, t, encoder_hidden_states=context).sample if diffusers else unet(x_t, t, context)


@pytest.mark.parametrize("layout", UNETS)
def test_unet_names_are_diffusers_conversion(layout):
    """Every parameter's diffusers name is where diffusers' own single-file conversion puts that tensor."""
    pipe = _pipeline(layout)
    state_dict = {k: torch.full_like(v, float(i)) for i, (k, v) in enumerate(pipe.unet.state_dict().items())}
    checkpoint = join_state_dicts(state_dict, {}, {})
    config = create_unet_diffusers_config_from_ldm(original_config(pipe.unet.config, pipe.spec.autoencoder),
                                                   checkpoint)
    where = {v.flatten()[0].item(): k for k, v in convert_ldm_unet_checkpoint(checkpoint, config).items()}
    names = diffusers_unet_names(pipe.unet)
    checked = 0
    for i, key in enumerate(state_dict):
        module, _, parameter = key.rpartition(".")
        if module in names:
            assert f"{names[module]}.{parameter}" == where[float(i)], key
            checked += 1
    assert checked == len(state_dict)


@pytest.mark.parametrize("layout", UNETS)
def test_kohya_lora_matches_diffusers(layout, tmp_path):
    pipe = _pipeline(layout)
    reference_unet = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
    reference_text = diffusers_text_encoder(copy.deepcopy(pipe.text_encoder))
    path = write(kohya_lora(pipe, seed=3), tmp_path / "kohya.safetensors")
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference_unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, reference_text)

    before = unet_output(pipe.unet)
    pipe.load_lora(path)
    ours = unet_output(pipe.unet)
    assert relative_error(ours, before) > 0.05  # the LoRA changes the output a lot...
    assert relative_error(ours, unet_output(reference_unet, diffusers=True)) < 1e-4  # ...as diffusers does
    tokens = pipe.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        reference_context = reference_text(tokens).last_hidden_state
        context = pipe.text_encoder(PROMPTS)
    assert relative_error(context, reference_context) < 1e-4


def test_peft_format_matches_diffusers(tmp_path):
    """diffusers / PEFT keys (`unet.<diffusers name>.lora_A.weight`), no alpha: scale 1."""
    pipe = _pipeline("sd2")
    reference = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
    generator, tensors = torch.Generator().manual_seed(4), {}
    for ours, theirs in diffusers_unet_names(pipe.unet).items():
        module = pipe.unet.get_submodule(ours)
        if isinstance(module, nn.Linear) and ".attentions." in theirs:
            down, up = _low_rank(module.weight, 2, generator)
            tensors |= {f"unet.{theirs}.lora_A.weight": down, f"unet.{theirs}.lora_B.weight": up}
    StableDiffusionPipeline.load_lora_into_unet(dict(tensors), None, reference)
    pipe.load_lora(write(tensors, tmp_path / "peft.safetensors"))
    assert relative_error(unet_output(pipe.unet), unet_output(reference, diffusers=True)) < 1e-4


@pytest.mark.parametrize("writer", ["diffusers", "peft"])
def test_peft_alphas_from_the_config_match_peft(writer, tmp_path):
    """A LoraConfig with alpha != r, rank_pattern and alpha_pattern, saved by diffusers (metadata in the
    safetensors file) or by PEFT (adapter_config.json beside adapter_model.safetensors): merged as PEFT's
    modules run, and (diffusers' file) as diffusers' load_lora_into_unet reads it."""
    pipe = _pipeline("sd2")
    reference = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
    config = peft.LoraConfig(r=4, lora_alpha=10, rank_pattern={"proj_in": 2}, init_lora_weights=False,
                             alpha_pattern={"to_k": 12, r"down_blocks\.1\..*to_v": 0.5},
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"])
    torch.manual_seed(8)
    model = peft.get_peft_model(reference, config).eval()
    if writer == "peft":
        model.save_pretrained(str(tmp_path))
        path = tmp_path / "adapter_model.safetensors"
    else:
        layers = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(model).items()}
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=config.to_dict())
        path = tmp_path / "pytorch_lora_weights.safetensors"
        reloaded = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reloaded, metadata=metadata)
    before = unet_output(pipe.unet)
    pipe.load_lora(path)
    ours, theirs = unet_output(pipe.unet), unet_output(reference, diffusers=True)
    assert relative_error(ours, before) > 0.05
    assert relative_error(ours, theirs) < 1e-4
    if writer == "diffusers":
        assert relative_error(ours, unet_output(reloaded, diffusers=True)) < 1e-4


@pytest.mark.parametrize("metadata, message", [
    ("{not json", "lora_adapter_metadata metadata is not JSON (Expecting property name"),
    ("[4]", "lora_adapter_metadata metadata is not a JSON object but list"),
    ('{"unet.r": "four"}', 'unet.r must be a whole number >= 1, got "four"'),
    ('{"unet.lora_alpha": true}', "unet.lora_alpha must be a number, got true"),
    ('{"unet.rank_pattern": {"to_k": 1.5}}', "unet.rank_pattern must be an object of regexes to whole numbers"),
    ('{"unet.alpha_pattern": {"(": 2}}', "unet.alpha_pattern must be an object of regexes to numbers"),
])
def test_bad_adapter_metadata_fails_in_one_line(metadata, message, tmp_path):
    pipe = _pipeline("sd2")
    name = next(theirs for theirs in diffusers_unet_names(pipe.unet).values() if theirs.endswith("attn1.to_k"))
    path = tmp_path / "bad.safetensors"
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(2, 32), f"unet.{name}.lora_B.weight": torch.zeros(32, 2)},
              str(path), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(InputError, match=re.escape(message)) as error:
        pipe.load_lora(path)
    assert "\n" not in str(error.value) and str(error.value).endswith("fix it or remove it (the scale is 1 without it)")


def _peft_layers(config: peft.PeftConfig) -> nn.Module:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(6, 8, 3, padding=1))
    return peft.get_peft_model(model, config).eval()


def _adapter_tensors(peft_layer: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The layer's adapter tensors under their LyCORIS names (PEFT's, less the adapter name)."""
    return {k.replace(".default", "").removesuffix(".weight"): v.detach().clone()
            for k, v in peft_layer.state_dict().items() if k.startswith(prefixes)}


@pytest.mark.parametrize("kind, alpha, layers", [("loha", 6, (0, 1)), ("lokr", 5, (0,)), ("lokr", 2, (0, 1))])
def test_lycoris_deltas_match_peft(kind, alpha, layers):
    """LoHa, and LoKr with w2 as two factors (linear) or whole (convolution), against PEFT's. With both LoKr
    factors whole, LyCORIS (and A1111, ComfyUI) scale by 1 where PEFT takes alpha / r: compared at alpha = r."""
    if kind == "loha":
        config = peft.LoHaConfig(r=3, alpha=alpha, target_modules=["0", "1"], init_weights=False)
    else:
        config = peft.LoKrConfig(r=2, alpha=alpha, target_modules=["0", "1"], init_weights=False, decompose_factor=2)
    model = _peft_layers(config)
    for index in layers:
        x = torch.randn(3, 12) if index == 0 else torch.randn(2, 6, 5, 5)
        layer = model.base_model.model[index]
        tensors = _adapter_tensors(layer, ("hada_", "lokr_")) | {"alpha": torch.tensor(float(alpha))}
        merged = copy.deepcopy(layer.base_layer)
        with torch.no_grad():
            merged.weight.copy_(merged_weight(merged.weight, tensors, 1.0))
            assert relative_error(merged(x), layer(x)) < 1e-5
            assert relative_error(merged(x), layer.base_layer(x)) > 0.01


class _TuckerLoCon(nn.Module):
    """kohya / LyCORIS' LoCon module at inference, from the file's tensors: the base convolution plus the
    1x1 down, the k x k mid (the base's stride and padding) and the 1x1 up run in sequence, times alpha / rank."""

    def __init__(self, base: nn.Conv2d, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base, self.t = base, tensors
        self.scale = tensors["alpha"].item() / tensors["lora_down.weight"].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.t["lora_down.weight"])
        h = F.conv2d(h, self.t["lora_mid.weight"], stride=self.base.stride, padding=self.base.padding)
        return self.base(x) + self.scale * F.conv2d(h, self.t["lora_up.weight"])


def test_tucker_locon_matches_its_convolutions_in_sequence(tmp_path):
    pipe = _pipeline()
    reference = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
    tensors = locon_tucker(pipe, seed=7)
    for name, _ in kernel_convs(pipe):
        key = f"lora_unet_{flat(name)}."
        reference.set_submodule(name, _TuckerLoCon(reference.get_submodule(name), {
            k.removeprefix(key): v for k, v in tensors.items() if k.startswith(key)}))
    before = unet_output(pipe.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is used
        pipe.load_lora(write(tensors, tmp_path / "locon.safetensors"))
    ours = unet_output(pipe.unet)
    assert relative_error(ours, before) > 0.05
    assert relative_error(ours, unet_output(reference, diffusers=True)) < 1e-4


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_lycoris_matches_peft(kind, tmp_path):
    """LoHa (hada_t1, hada_t2) and LoKr (lokr_t2) on every k x k convolution of the U-Net, against PEFT's
    modules with use_effective_conv2d on the diffusers U-Net, on the same tensors."""
    pipe = _pipeline()
    reference = diffusers_unet(copy.deepcopy(pipe.unet), pipe.spec.autoencoder)
    names = [name for name, _ in kernel_convs(pipe)]
    if kind == "loha":
        config = peft.LoHaConfig(r=3, alpha=6, target_modules=names, use_effective_conv2d=True, init_weights=False)
    else:
        config = peft.LoKrConfig(r=2, alpha=5, target_modules=names, use_effective_conv2d=True, init_weights=False)
    reference = peft.inject_adapter_in_model(config, reference).eval()
    tensors = {}
    for name in names:
        layer = reference.get_submodule(name)
        if kind == "loha":  # PEFT's random LoHa changes the output too little to tell
            with torch.no_grad():
                layer.hada_w1_a["default"].mul_(8)
                layer.hada_w2_a["default"].mul_(8)
        found = _adapter_tensors(layer, ("hada_", "lokr_"))
        assert ("hada_t1" in found and "hada_t2" in found) if kind == "loha" else "lokr_t2" in found
        tensors |= {f"lora_unet_{flat(name)}.{k}": v for k, v in found.items()}
        tensors[f"lora_unet_{flat(name)}.alpha"] = torch.tensor(float(config.alpha))
    before = unet_output(pipe.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora(write(tensors, tmp_path / f"{kind}.safetensors"))
    ours = unet_output(pipe.unet)
    assert relative_error(ours, before) > 0.05
    assert relative_error(ours, unet_output(reference, diffusers=True)) < 1e-4


def test_dora_matches_peft():
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = _peft_layers(config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)  # a magnitude other than the initial norms
    adapter = _adapter_tensors(layer, ("lora_A", "lora_B"))
    tensors = {"down": adapter["lora_A"], "up": adapter["lora_B"], "alpha": torch.tensor(6.0),
               "dora_scale": layer.lora_magnitude_vector["default"].weight.detach().reshape(-1, 1)}
    merged = copy.deepcopy(layer.base_layer)
    x = torch.randn(4, 12)
    with torch.no_grad():
        merged.weight.copy_(merged_weight(merged.weight, tensors, 1.0))
        assert relative_error(merged(x), layer(x)) < 1e-5


@pytest.mark.parametrize("tucker", [False, True])
def test_unload_restores_exactly_and_weights_add_up(tucker, tmp_path):
    """Strengths add up linearly and unloading restores every weight bit for bit; with `tucker`, the k x k
    convolutions' LoCon is Tucker-decomposed (lora_mid), and the weight checked is one of them."""
    pipe = _pipeline()
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    first, second = (write(kohya_lora(pipe, seed=seed, text=False) | (locon_tucker(pipe, seed) if tucker else {}),
                           tmp_path / f"{seed}.safetensors") for seed in (3, 4))
    name = f"input_blocks.1.{'0.in_layers.2' if tucker else '1.transformer_blocks.0.attn2.to_k'}.weight"
    deltas = {}
    for path in (first, second):
        pipe.load_lora(path)
        deltas[path] = pipe.unet.get_parameter(name) - original[name]
    pipe.load_lora([(first, 0.5), (second, -1.5)])
    expected = original[name] + 0.5 * deltas[first] - 1.5 * deltas[second]
    assert torch.allclose(pipe.unet.get_parameter(name), expected, atol=1e-6)
    pipe.unload_lora()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())


def test_unload_hands_back_the_original_tensors_and_keeps_buffers(tmp_path):
    """Unloading puts the original storage back (no copy); the next merge reuses the merged weights'
    buffers; release frees them; a model cast while merged gets the originals' values in its new dtype."""
    pipe = _pipeline()
    path = write(kohya_lora(pipe, seed=3, text=False), tmp_path / "a.safetensors")
    weight = pipe.unet.get_parameter("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    original, original_ptr = weight.detach().clone(), weight.data_ptr()
    pipe.load_lora(path)
    merged_ptr = weight.data_ptr()
    assert merged_ptr != original_ptr and not torch.equal(weight, original)
    pipe.unload_lora()
    assert weight.data_ptr() == original_ptr and torch.equal(weight, original)
    pipe.load_lora(path)
    assert weight.data_ptr() == merged_ptr
    pipe.unload_lora(release=True)
    assert not pipe.adapters._buffers
    pipe.load_lora(path)
    pipe.unet.double()
    pipe.unload_lora()
    assert weight.dtype == torch.float64 and torch.equal(weight, original.double())


def test_prompt_tag_merges_the_named_file_and_is_not_encoded(tmp_path):
    pipe = _pipeline()
    (tmp_path / "styles").mkdir()
    path = write(kohya_lora(pipe, seed=3, text=False), tmp_path / "styles" / "paper cut.safetensors")
    reference = _pipeline().load_lora(path, 0.7)
    pipe.lora_dir = tmp_path
    prompt, tags = split_lora_tags("a red circle <lora:paper cut:0.7>")
    assert (prompt, tags) == ("a red circle ", [("paper cut", 0.7)])
    tagged = pipe(["a red circle <lora:paper cut:0.7>"], steps=2, output_type="latent", progress=False)
    plain = reference(["a red circle "], steps=2, output_type="latent", progress=False)
    assert torch.equal(tagged, plain)
    assert pipe.model_text()["lora_hashes"].startswith("paper cut: ")
    pipe(["a red circle"], steps=1, output_type="latent", progress=False)  # no tag: the LoRA comes out
    assert torch.equal(pipe.unet.get_parameter("out.2.weight"), _pipeline().unet.get_parameter("out.2.weight"))


def test_partial_match_says_how_many_layers_were_used(tmp_path):
    pipe = _pipeline()
    tensors = kohya_lora(pipe, seed=3, text=False)
    tensors |= {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.warns(UserWarning, match=r"used \d+ of \d+ layers; ignored 1 .*down_blocks_7"):
        pipe.load_lora(write(tensors, tmp_path / "extra.safetensors"))


def _wrong_family_lora(width: int, sdxl: bool = False) -> dict:
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(640, 4)}
    if sdxl:
        tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
    return tensors


@pytest.mark.parametrize("width, sdxl, family", [(768, False, "SD 1.x"), (1024, False, "SD 2.x"),
                                                 (2048, True, "SDXL")])
def test_lora_of_another_family_is_refused_naming_it(width, sdxl, family, tmp_path):
    with pytest.raises(InputError, match=f"matches no layer of this custom model: it looks made for {family}"):
        _pipeline().load_lora(write(_wrong_family_lora(width, sdxl), tmp_path / "other.safetensors"))


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_bad_lora_files_fail_in_one_line(tmp_path):
    pipe = _pipeline()
    good = write(kohya_lora(pipe, seed=3, text=False), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    evil = tmp_path / "evil.pt"
    payload = _RunsCode()
    payload.marker = str(tmp_path / "ran")
    evil.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": payload}))
    for path, message in ((truncated, "truncated or corrupt"), (evil, "cannot read"),
                          (tmp_path / "missing.safetensors", "LoRA not found")):
        with pytest.raises(InputError, match=message):
            pipe.load_lora(path)
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and a LoRA folder holding `style.safetensors` made for it."""
    folder = tmp_path_factory.mktemp("lora")
    pipe = _pipeline()
    (folder / "loras").mkdir()
    write(kohya_lora(pipe, seed=3), folder / "loras" / "style.safetensors")
    return pipe.save(folder / "tiny.safetensors"), folder / "loras"


def _txt2img(argv: list[str], capsys) -> tuple[int, str]:
    code = run_main(txt2img.main, [*argv, "--steps", "2", "--skip_grid"])
    return code, capsys.readouterr()


def test_txt2img_records_loras_and_replays_them(tiny_ckpt, tmp_path, capsys):
    ckpt, loras = tiny_ckpt
    out = tmp_path / "out"
    code, captured = _txt2img(["--ckpt", str(ckpt), "--outdir", str(out), "--prompt", "a circle <lora:style:0.6>",
                               "--lora_dir", str(loras), "--lora", f"{loras / 'style.safetensors'}:0.3"], capsys)
    assert code == 0, captured.err
    png = Path(captured.out.split()[0])
    with Image.open(png) as image:
        text = dict(image.text)
        pixels = image.tobytes()
    assert text["lora"] == f"{(loras / 'style.safetensors').resolve()}:0.3"
    assert text["lora_hashes"].count("style: ") == 2
    code, captured = _txt2img(["--ckpt", str(ckpt), "--outdir", str(out), "--replay", str(png),
                               "--lora_dir", str(loras)], capsys)
    assert code == 0, captured.err
    with Image.open(captured.out.split()[0]) as image:
        assert image.tobytes() == pixels
    code, captured = _txt2img(["--ckpt", str(ckpt), "--outdir", str(tmp_path / "none"), "--replay", str(png),
                               "--lora_dir", str(tmp_path)], capsys)
    assert code == 1 and captured.err.strip() == (f"error: <lora:style> names no file in {tmp_path} (looked for "
                                                  "style.safetensors, .pt, .ckpt)")


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a <lora:style:abc>"], "LoRA weight 'abc' in '<lora:style:abc>' is not a finite number"),
    (["--prompt", "a circle", "--lora", "style.safetensors:nan"], "is not a finite number"),
    (["--prompt", "a <lora:gone:1>"], "<lora:gone> names no file in"),
    (["--prompt", "a <lora:style>"], None),
])
def test_txt2img_bad_lora_input_is_one_line_without_output(tiny_ckpt, tmp_path, capsys, extra, message):
    ckpt, loras = tiny_ckpt
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, captured = _txt2img(["--ckpt", str(ckpt), "--outdir", str(out), "--lora_dir", str(loras), *extra],
                                  capsys)
    if message is None:
        assert code == 0, captured.err
        return
    assert code == 1 and captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not list(out.glob("*.png"))
