"""U-Net: layout of the real SD configs, conditioning, odd sizes, gradient checkpointing, CPU fast paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldm.nn
from ldm.attention import GEGLU, SpatialTransformer
from ldm.nn import ONEDNN_LINEAR_DTYPES, SMALL_MAP_PIXELS, Conv2d, GroupNorm32, Linear
from ldm.unet import UNetConfig, UNetModel
from tests.conftest import randomize_, tiny_spec

SD1 = UNetConfig()
SD2 = UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)


def test_real_sd_configs_have_the_original_key_layout():
    with torch.device("meta"):
        sd1, sd2 = UNetModel(SD1), UNetModel(SD2)
    keys1, keys2 = sd1.state_dict(), sd2.state_dict()
    # Parameter counts of the released models (859.52M for SD 1.x, 865.91M for SD 2.x).
    assert round(sum(p.numel() for p in sd1.parameters()) / 1e4) == 85952
    assert round(sum(p.numel() for p in sd2.parameters()) / 1e4) == 86591
    assert len(keys1) == len(keys2) == 686
    # Landmarks of the original layout and shapes: conv vs linear projections, heads of width 64.
    assert keys1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert keys2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert keys1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert keys2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert keys1["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert keys1["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert keys1["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert keys1["output_blocks.8.2.conv.weight"].shape == (640, 640, 3, 3)
    assert keys1["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (10240, 1280)
    assert keys1["out.2.weight"].shape == (4, 320, 3, 3)
    assert keys1["time_embed.0.weight"].shape == (1280, 320)
    assert sd2.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5  # 320 / 64
    assert sd1.input_blocks[1][1].transformer_blocks[0].attn1.heads == 8


def test_context_and_timestep_change_the_output():
    unet = randomize_(UNetModel(tiny_spec().unet).eval())
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 64)
    t = torch.tensor([10, 500])
    base = unet(x, t, context)
    assert not torch.allclose(base, unet(x, t, torch.randn(2, 77, 64)), atol=1e-4)
    assert not torch.allclose(base, unet(x, t + 100, context), atol=1e-4)
    # Rows are independent: row 0 depends on its own inputs only.
    assert torch.allclose(base[:1], unet(x[:1], t[:1], context[:1]), atol=1e-5)


def test_odd_latent_sizes_keep_their_shape():
    unet = randomize_(UNetModel(tiny_spec().unet).eval())
    out = unet(torch.randn(1, 4, 9, 7), torch.tensor([3]), torch.randn(1, 5, 64))
    assert out.shape == (1, 4, 9, 7)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    unet = randomize_(UNetModel(tiny_spec().unet))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 7, 64)

    def grads() -> list[torch.Tensor]:
        unet.zero_grad()
        unet(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    unet.gradient_checkpointing = True
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


@pytest.fixture
def narrow_layers_fast(monkeypatch):
    """The CPU fast paths for the narrow layers of these tests (by default they start at SD's widths)."""
    monkeypatch.setattr(ldm.nn, "SMALL_MAP_MIN_CHANNELS", 1)
    monkeypatch.setattr(ldm.nn, "ONEDNN_MIN_FEATURES", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "bias"), [
    ((4, 4), 3, 1, 1, True), ((8, 8), 3, 2, 1, True), ((7, 5), 3, 1, 1, False), ((6, 6), 3, 1, 0, True),
    ((8, 8), 1, 1, 0, True), ((32, 32), 3, 1, 1, True),
])
def test_small_map_convolution_matches_conv2d_and_its_gradients(dtype, size, kernel, stride, padding, bias,
                                                                 narrow_layers_fast):
    torch.manual_seed(0)
    conv = Conv2d(24, 40, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    x = torch.randn(3, 24, *size, dtype=dtype, requires_grad=True)
    out = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ((out - ref).float().norm() / ref.float().norm()).item() < tolerance
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, [x, conv.weight], grad)
    theirs = torch.autograd.grad(ref, [x, conv.weight], grad)
    for a, b in zip(ours, theirs, strict=True):
        assert ((a - b).float().norm() / b.float().norm()).item() < tolerance


def test_small_map_convolution_takes_the_matrix_product_path_only_on_small_wide_maps(monkeypatch):
    conv = Conv2d(1024, 8, 3, padding=1)
    calls = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(F, "unfold", lambda *args: calls.append(args[0].shape) or unfold(*args))
    with torch.no_grad():
        conv(torch.randn(1, 1024, 8, 8))
        conv(torch.randn(1, 1024, 9, 8))  # 72 > SMALL_MAP_PIXELS output pixels: oneDNN's convolution
        conv(torch.randn(2, 1024, 8, 8).to(memory_format=torch.channels_last))  # NHWC stays NHWC
        Conv2d(512, 8, 3, padding=1)(torch.randn(1, 512, 8, 8))  # under SMALL_MAP_MIN_CHANNELS
    assert SMALL_MAP_PIXELS == 64 and calls == [(1, 1024, 8, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_nn_linear_with_and_without_gradients(dtype, bias, narrow_layers_fast):
    torch.manual_seed(0)
    linear = Linear(48, 40, bias=bias).to(dtype)
    x = torch.randn(2, 7, 48, dtype=dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        out, ref = linear(x), F.linear(x, linear.weight, linear.bias)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ((out - ref).float().norm() / ref.float().norm()).item() < tolerance
    x.requires_grad_(True)
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(linear(x), [x, linear.weight], grad)
    theirs = torch.autograd.grad(F.linear(x, linear.weight, linear.bias), [x, linear.weight], grad)
    for a, b in zip(ours, theirs, strict=True):
        assert ((a - b).float().norm() / b.float().norm()).item() < tolerance


@pytest.mark.skipif(torch.bfloat16 not in ONEDNN_LINEAR_DTYPES, reason="no oneDNN bf16 linear in this build or CPU")
def test_linear_takes_onednn_only_for_cpu_inference(monkeypatch):
    monkeypatch.setattr(ldm.nn, "ONEDNN_MIN_FEATURES", 4)
    linear = Linear(8, 4)
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda x, *args: calls.append(x.dtype) or onednn(x, *args))
    x = torch.randn(3, 8)
    linear(x)  # the weight needs a gradient: nn.Linear's path
    with torch.no_grad():
        linear(x)
        linear.to(torch.bfloat16)(x.bfloat16())
        linear.half()(x.half())  # no oneDNN float16 kernel on most CPUs
        with torch.autocast("cpu", torch.bfloat16):
            linear.float()(x)
        monkeypatch.setattr(ldm.nn, "ONEDNN_MIN_FEATURES", 8)
        linear(x)  # 4 outputs: too narrow for oneDNN's per-call cost
    assert calls == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_fused_on_onednn_matches_its_formula(dtype, narrow_layers_fast):
    torch.manual_seed(0)
    geglu = GEGLU(32, 48).to(dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    with torch.no_grad():
        value, gate = F.linear(x.float(), geglu.proj.weight.float(), geglu.proj.bias.float()).chunk(2, dim=-1)
        ref = value * F.gelu(gate)
        out = geglu(x)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.shape == ref.shape and out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < tolerance


def test_geglu_runs_the_hooks_of_its_projection(narrow_layers_fast):
    geglu = GEGLU(8, 4)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        plain = geglu(x)
        geglu.proj.register_forward_hook(lambda module, args, out: out + 1)
        value, gate = (F.linear(x, geglu.proj.weight, geglu.proj.bias) + 1).chunk(2, dim=-1)
        assert not torch.allclose(geglu(x), plain)
        assert torch.allclose(geglu(x), value * F.gelu(gate), atol=1e-6)


def test_linear_spatial_transformer_returns_a_contiguous_nchw_map():
    # SDXL's linear proj_out leaves an NHWC view; an NHWC output would make every later conv reorder.
    transformer = SpatialTransformer(64, heads=2, dim_head=32, context_dim=16, use_linear=True)
    with torch.no_grad():
        out = transformer(torch.randn(2, 64, 4, 4), torch.randn(2, 5, 16))
    assert out.is_contiguous()


def test_bf16_group_norm_gives_the_numbers_of_a_float32_copy():
    torch.manual_seed(0)
    norm = GroupNorm32(8, 64).bfloat16()
    x = (torch.randn(2, 64, 8, 8) * 3 + 5).bfloat16()
    upcast = F.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), norm.eps).bfloat16()
    with torch.no_grad():
        assert torch.equal(norm(x), upcast)
