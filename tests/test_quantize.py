"""int8 U-Nets through torchao (`ldm.quantize`, `Pipeline.quantize_unet`, `--quantize`): outputs near the float
ones but not equal to them, the int8 rounding itself, and what is refused (a missing torchao, LoRAs, the compile
cache)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldm.cli import run_main
from ldm.errors import InputError
from ldm.layer_names import diffusers_unet_names, flat
from ldm.pipeline import Pipeline
from ldm.quantize import QUANTIZE_MODES, quantize_unet, quantized_weights
from ldm.settings import GenerationSettings
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import serve  # noqa: E402
import txt2img  # noqa: E402

INT8_MODES = [mode for mode in QUANTIZE_MODES if mode != "off"]
# Relative L2 error of the tiny random U-Net's output against the same U-Net unquantized (fp32; bf16 and fp16
# against themselves). int8 with one scale per row (max |w| / 127.5) rounds a weight by at most half a step;
# for a Gaussian row that moves one Linear's output by about 0.7 % (measured: 0.72 %), and the convolutions
# and residual paths around the Linears dilute it: measured 0.036 % (int8-weight) and 0.068 % (int8-dynamic)
# in fp32, 0.072 % / 0.17 % for the bundled model's trained weights. The bound leaves 7x room over the
# largest; the floor is far above float noise (rerunning a float U-Net changes nothing).
MAX_ERROR, MIN_ERROR = 5e-3, 1e-5


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def unet_inputs(context_dim: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999, 100]),
            torch.randn(2, 77, context_dim, generator=generator))


@torch.no_grad()
def forward(unet: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    x_t, t, context = unet_inputs()
    return unet(x_t.to(dtype), t, context.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", INT8_MODES)
def test_int8_unet_is_near_the_float_one_but_not_equal(tiny_pipeline, mode, dtype):
    unet = tiny_pipeline.unet.to(dtype)
    expected = forward(unet, dtype)
    quantize_unet(unet, mode)
    linears = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    assert quantized_weights(unet) == len(linears) > 0  # every Linear weight, nothing else
    assert all(type(m.weight).__module__.startswith("torchao.") and m.weight.dtype == dtype for m in linears)
    assert all(type(m.weight) is nn.Parameter for m in unet.modules() if isinstance(m, nn.Conv2d))
    error = relative_error(forward(unet, dtype), expected)
    assert MIN_ERROR < error < MAX_ERROR, error


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per row with torchao's symmetric scale (max |x| / 127.5), back in float."""
    scale = (x.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return (x / scale).round().clamp(-128, 127) * scale


@pytest.mark.parametrize("mode", INT8_MODES)
def test_int8_linear_computes_with_the_rounded_weights(mode):
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 128), torch.randn(2, 77, 64)
    with torch.no_grad():
        expected = linear(x)
        rounded = nn.functional.linear(int8_rounded(x) if mode == "int8-dynamic" else x, int8_rounded(linear.weight),
                                       linear.bias)
        quantized = quantize_unet(nn.Sequential(linear), mode)(x)
    # The int8 kernels' result is the rounded weights' (and activations') product up to float rounding and
    # a few activations rounded the other way: several times closer to it than to the float product.
    assert relative_error(quantized, rounded) < relative_error(quantized, expected) / 5


def test_unknown_mode_is_one_line(tiny_pipeline, capsys):
    message = "unknown quantize mode 'int4'; choose one of off, int8-weight, int8-dynamic"
    with pytest.raises(InputError, match=re.escape(message)):
        quantize_unet(tiny_pipeline.unet, "int4")
    with pytest.raises(InputError, match=re.escape(message)):
        tiny_pipeline.quantize_unet("int4")
    assert run_main(txt2img.main, ["--prompt", "a", "--quantize", "int4"]) == 1
    err = capsys.readouterr().err  # argparse quotes the choices since Python 3.12.8 / 3.11.11
    assert err.startswith("error: argument --quantize: invalid choice: 'int4' (choose from ") and err.count("\n") == 1
    assert all(mode in err for mode in QUANTIZE_MODES) and err.endswith(") (see --help)\n")


def test_a_backend_without_the_kernels_is_one_line_and_leaves_the_unet_float(tiny_pipeline, monkeypatch):
    """Where torchao's int8 matmul is missing (simulated: every Linear call fails as it would there), the
    probe layer says so before any U-Net weight changes."""
    def missing(self, x):
        raise NotImplementedError("Could not run 'aten::_int_mm' with arguments from the 'X' backend.\nmore")

    monkeypatch.setattr(nn.Linear, "forward", missing)
    message = ("torchao's int8-dynamic kernels do not run on cpu in torch.float32 (Could not run 'aten::_int_mm' "
               "with arguments from the 'X' backend.); use --device cpu or leave out --quantize")
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        tiny_pipeline.quantize_unet("int8-dynamic")
    assert quantized_weights(tiny_pipeline.unet) == 0 and tiny_pipeline.quantize_mode == "off"


def test_ldm_imports_and_runs_float_without_torchao():
    code = ("import sys; sys.modules['torchao'] = None\n"
            "import ldm.pipeline, ldm.quantize, ldm.server.engine\n"
            "from ldm.quantize import quantize_unet; import torch\n"
            "assert quantize_unet(torch.nn.Linear(2, 2), 'off') is not None")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_torchao_is_one_line_and_writes_nothing(random_ckpt, tmp_path, monkeypatch, capsys):
    for name in ("torchao", "torchao.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import torchao` finds when it is not installed
    out = tmp_path / "out"
    code = run_main(txt2img.main, ["--ckpt", str(random_ckpt), "--outdir", str(out), "--prompt", "a", "--steps", "1",
                                   "--quantize", "int8-weight"])
    assert code == 1
    assert capsys.readouterr().err == ("error: int8 quantization needs torchao: pip install torchao (or this "
                                       "package's int8 extra, pip install 'ldm[int8]'), or leave out --quantize\n")
    assert not list(out.glob("*.png"))


def run_txt2img(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_main(txt2img.main, [*argv, "--steps", "2", "--seed", "3", "--skip_grid", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_txt2img_quantize_writes_an_image_near_the_float_one(random_ckpt, tmp_path, capsys):
    pixels = {}
    for mode in ("off", "int8-dynamic"):
        code, out, err = run_txt2img(["--ckpt", str(random_ckpt), "--outdir", str(tmp_path / mode),
                                      "--prompt", "a red circle", "--quantize", mode], capsys)
        assert code == 0, err
        with Image.open(out.split()[0]) as image:
            pixels[mode] = np.asarray(image, dtype=np.float64)
    # The default --compile auto has no cached int8 programs, as with an empty cache: eager, nothing to say.
    assert "warning" not in err, err
    difference = np.abs(pixels["int8-dynamic"] - pixels["off"])
    assert 0 < difference.mean() < 1, difference.mean()  # 8-bit levels: a few pixels move by one or two


def lora_file(pipe: Pipeline, path: Path, unet: bool = True, text: bool = True) -> Path:
    """A kohya LoRA on one U-Net Linear (the first attention's to_q) and/or one text-encoder Linear."""
    generator, tensors = torch.Generator().manual_seed(5), {}
    keys = []
    if unet:
        names = diffusers_unet_names(pipe.unet)
        name = next(n for n in names if n.endswith("attn1.to_q"))
        keys.append((f"lora_unet_{flat(names[name])}", pipe.unet.get_submodule(name).weight.shape))
    if text:
        keys.append(("lora_te_text_model_encoder_layers_0_mlp_fc1",
                     pipe.text_encoder.get_parameter("transformer.resblocks.0.mlp.c_fc.weight").shape))
    for key, (out_features, in_features) in keys:
        tensors |= {f"{key}.lora_down.weight": torch.randn(2, in_features, generator=generator),
                    f"{key}.lora_up.weight": torch.randn(out_features, 2, generator=generator),
                    f"{key}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(path))
    return path


def test_loras_are_refused_on_int8_weights_and_kept_off_them(tiny_pipeline, tmp_path):
    both, text_only = lora_file(tiny_pipeline, tmp_path / "both.safetensors"), lora_file(
        tiny_pipeline, tmp_path / "text.safetensors", unet=False)
    tiny_pipeline.load_lora(both)
    with pytest.raises(InputError, match="the LoRA both is merged into the U-Net, and LoRAs cannot be merged into "
                                         "int8 weights: unload it"):
        tiny_pipeline.quantize_unet("int8-dynamic")
    assert quantized_weights(tiny_pipeline.unet) == 0
    tiny_pipeline.unload_lora().quantize_unet("int8-dynamic")
    weights = {name: p.qdata.clone() for name, p in tiny_pipeline.unet.named_parameters() if hasattr(p, "qdata")}
    message = ("the LoRA both changes the U-Net, whose weights are int8 (--quantize int8-dynamic); LoRAs cannot be "
               "merged into int8 weights: generate without --quantize to use it")
    with pytest.raises(InputError, match=re.escape(message)):
        tiny_pipeline.load_lora(both)
    settings = GenerationSettings(prompt="a", steps=1, lora=(str(both),))
    with pytest.raises(InputError, match=re.escape(message)):
        tiny_pipeline.generate(settings, progress=False)
    # A LoRA of the text encoder alone still merges; the int8 weights are untouched by all of it.
    tiny_pipeline.load_lora(text_only)
    assert [a.name for a, _ in tiny_pipeline.adapters.active] == ["text"]
    tiny_pipeline.generate(GenerationSettings(prompt="a", steps=1), progress=False)
    assert all(torch.equal(tiny_pipeline.unet.get_parameter(name).qdata, w) for name, w in weights.items())


def test_txt2img_lora_on_int8_is_one_line_without_output(tiny_pipeline, tmp_path, capsys):
    ckpt = tiny_pipeline.save(tmp_path / "tiny.safetensors")
    lora = lora_file(tiny_pipeline, tmp_path / "style.safetensors")
    out = tmp_path / "out"
    code, _, err = run_txt2img(["--ckpt", str(ckpt), "--outdir", str(out), "--prompt", "a", "--lora", str(lora),
                                "--quantize", "int8-weight", "--compile", "off"], capsys)
    assert code == 1 and err.count("\n") == 1 and "LoRAs cannot be merged into int8 weights" in err, err
    assert not list(out.glob("*.png"))


def test_compiling_quantizing_saving_and_casting_in_the_wrong_order_are_refused(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline.quantize_unet("int8-weight")
    assert pipe.quantize_unet("int8-weight") is pipe  # again: nothing to do
    with pytest.raises(InputError, match=r"already quantized \(int8-weight\); load the checkpoint again"):
        pipe.quantize_unet("int8-dynamic")
    with pytest.raises(InputError, match="the compile cache keeps no int8 U-Nets; with --quantize use --compile jit"):
        pipe.compile_unet("cache", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.compile_unet("auto", tmp_path)  # eager, as with an empty cache
    assert pipe.compiled_unet is None and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="choose its precision before quantizing"):
        pipe.to(dtype=torch.bfloat16)
    with pytest.raises(InputError, match="save the pipeline before quantizing"):
        pipe.save(tmp_path / "x.safetensors")
    compiled = Pipeline.from_spec(tiny_spec()).compile_unet("jit")
    with pytest.raises(InputError, match="quantize the U-Net before compiling it"):
        compiled.quantize_unet("int8-weight")


def test_serve_quantizes_every_model_it_loads(random_ckpt):
    from ldm.server.engine import Catalog, Engine

    args, config = serve.parse_config(["--ckpt", str(random_ckpt), "--quantize", "int8-dynamic", "--compile", "off"])
    assert config.quantize == "int8-dynamic"
    engine = Engine(Catalog(config.checkpoint), torch.device("cpu"), config.dtype, compile=config.compile,
                    quantize=config.quantize)
    pipe = engine.load(random_ckpt)
    assert pipe.quantize_mode == "int8-dynamic" and quantized_weights(pipe.unet) > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", INT8_MODES)
def test_jit_compiled_int8_unet_matches_eager(mode):
    """torch.compile (with freezing) of the int8 U-Net: about 40 s per mode on 2 cores."""
    pipe = Pipeline.from_spec(tiny_spec())
    randomize_(pipe.unet, seed=1)
    eager = copy.deepcopy(pipe.unet)
    quantize_unet(eager, mode)
    pipe.quantize_unet(mode).compile_unet("jit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = forward(pipe.unet, torch.float32)
    expected = forward(eager, torch.float32)
    assert relative_error(compiled, expected) < 1e-3
