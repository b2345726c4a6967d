"""Precision names, as the scripts' `--precision` takes them, -> the dtype of each pipeline stage.

    fp32 (full)  float32
    fp16, bf16   that dtype (SDXL's autoencoder stays float32 under fp16: see `Pipeline.to`)
    autocast     the original scripts' default: fp16 on accelerators, fp32 on a CPU
    auto         fp16 on accelerators; on a CPU bf16 where it pays, fp32 elsewhere

bf16 pays on a CPU with bf16 matrix instructions (AMX or AVX512-BF16) for the U-Net and the autoencoder
of a model large enough to keep them busy: SD 1.5's U-Net ran 2-3x faster in bf16, the bundled
4 M-parameter model slightly slower. The text encoder, run once per batch, stays float32 on a CPU: its
attention was slower in bf16 (docs/benchmarks.md, "bf16 on the CPU", with the image error against fp32).
"""

from __future__ import annotations

import torch

from ldm.errors import InputError

PRECISIONS = {"full": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = ("auto", "autocast", *PRECISIONS)
# U-Nets at least this large run in bf16 under `auto` on a CPU that has bf16 matrix instructions: every SD
# release (SD 1.x 860 M, SDXL 2.6 G) is above it, small models like the bundled one below.
AUTO_BF16_MIN_PARAMETERS = 100_000_000


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX, or AVX512-BF16 on Intel and AMD)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def stage_dtypes(precision: str, device: torch.device, unet_parameters: int) -> dict[str, torch.dtype]:
    """{"unet", "text_encoder", "autoencoder"} -> the dtype `precision` (one of PRECISION_NAMES) means for a
    model whose U-Net has `unet_parameters`, on `device`."""
    if precision not in PRECISION_NAMES:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_NAMES)}")
    if precision in PRECISIONS:
        dtype = text_dtype = PRECISIONS[precision]
    elif device.type != "cpu":
        dtype = text_dtype = torch.float16
    elif precision == "auto" and unet_parameters >= AUTO_BF16_MIN_PARAMETERS and cpu_has_bf16_matmul():
        dtype, text_dtype = torch.bfloat16, torch.float32
    else:
        dtype = text_dtype = torch.float32
    return {"unet": dtype, "text_encoder": text_dtype, "autoencoder": dtype}
