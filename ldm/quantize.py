"""int8 U-Net weights through torchao (optional: `pip install torchao`, or this package's `int8` extra).

    off           the U-Net as loaded
    int8-weight   int8 weights, one scale per output row (torchao's Int8WeightOnlyConfig); activations stay
                  in the U-Net's dtype and each call converts the weights back to it before the matmul
    int8-dynamic  int8 weights and int8 activations, scaled per token at each call
                  (Int8DynamicActivationInt8WeightConfig): integer matmuls

Only the nn.Linear layers are quantized (attention projections, feed-forward, time embedding, and SD 2's
transformer projections): torchao's int8 configs handle Linear only, so the convolutions stay in the U-Net's
dtype. That is 31 % of SD 1.5's U-Net parameters. Quantizing cannot be undone: the float weights are gone.
Speed and image error against float32 are in docs/benchmarks.md ("int8 on the CPU"); on a CPU without AMX
int8 gained little.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ldm.errors import InputError, first_line

QUANTIZE_MODES = ("off", "int8-weight", "int8-dynamic")


def _torchao_configs() -> dict[str, type]:
    """Mode -> torchao config class; InputError when torchao is not installed."""
    # torch logs a deprecation warning when torchao registers one of its enums, on every import: not the
    # user's to act on.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:
        raise InputError("int8 quantization needs torchao: pip install torchao (or this package's int8 extra, "
                         "pip install 'ldm[int8]'), or leave out --quantize") from None
    finally:
        pytree_log.setLevel(level)
    return {"int8-weight": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig}


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise InputError(f"unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")


def _is_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_unet(unet: nn.Module, mode: str) -> nn.Module:
    """Quantize `unet`'s Linear layers in place to `mode` (one of QUANTIZE_MODES; "off" leaves it as it is).
    Their weights become torchao tensor subclasses that still report the U-Net's float dtype."""
    check_mode(mode)
    if mode == "off":
        return unet
    weight = next(unet.parameters())
    # set_inductor_config=False: torchao would otherwise switch on process-wide inductor settings (coordinate
    # descent tuning) that slow every later compile and are never restored.
    config = _torchao_configs()[mode](set_inductor_config=False)
    _check_kernels(config, mode, weight.device, weight.dtype)
    from torchao.quantization import quantize_

    quantize_(unet, config, filter_fn=_is_linear)
    return unet


def _check_kernels(config: object, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """InputError unless torchao's kernels for `config` run on `device` in `dtype`, tried on one small layer:
    CPU (fp32, bf16, fp16: tests/test_quantize.py) and CUDA have them; on other backends the dynamic mode's
    integer matmul may be missing, which would otherwise surface deep inside the first sampling step."""
    from torchao.quantization import quantize_

    probe = nn.Linear(32, 32).to(device, dtype)
    try:
        quantize_(probe, config)
        with torch.no_grad():
            probe(torch.zeros(2, 32, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError, TypeError) as error:
        raise InputError(f"torchao's {mode} kernels do not run on {device.type} in {dtype} ({first_line(error)}); "
                         "use --device cpu or leave out --quantize") from None


def quantized_weights(module: nn.Module) -> int:
    """How many of `module`'s parameters are torchao tensor subclasses (0: not quantized)."""
    return sum(type(p).__module__.startswith("torchao.") for p in module.parameters())
