"""Text (and optionally an image) -> latents -> images: the three stages chained by a sampler with
classifier-free guidance."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldm.attention import DEFAULT_SLICE_SIZE, set_attention_backend
from ldm.autoencoder import AutoencoderKL
from ldm.compile_cache import CompiledUNet
from ldm.conditioner import Conditioner, micro_conditioning
from ldm.embeddings import read_embeddings
from ldm.errors import InputError
from ldm.files import sha256_file
from ldm.guidance import ClassifierFreeGuidance
from ldm.images import load_image, to_pil
from ldm.img2img import InpaintingUNet, LatentBlend, UNet, latent_masks, masked_images, start_step
from ldm.layer_names import text_encoder_layers, unet_layers
from ldm.lora import Adapter, MergedAdapters, find_adapter, parse_lora_spec, read_adapter, split_lora_tags
from ldm.memory import available_memory, estimate_memory, format_bytes
from ldm.precision import stage_dtypes
from ldm.prompts import Encoded, encode_prompts_pooled
from ldm.quantize import check_mode, quantize_unet
from ldm.refiner import RefinerSwitch, switch_timestep
from ldm.samplers import sample
from ldm.sampling import FROM_NOISE, StartPoint, StepCallback, randn
from ldm.schedule import NoiseSchedule
from ldm.sd_checkpoint import (
    SDXL_FAMILIES,
    ModelSpec,
    autoencoder_file,
    detect_spec,
    ema_unet,
    split_state_dict,
    write_checkpoint,
)
from ldm.settings import FIELDS, GenerationSettings
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tiling import tiled_decode, tiled_encode
from ldm.unet import UNetModel
from ldm.weights_io import load_strict, read_checkpoint


def compile_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile `module` in place (state dict keys unchanged) with static shapes and inductor's
    freezing: the weights become constants of the compiled graph, so on a CPU the convolution and
    linear weights are packed for oneDNN once instead of at every call. On a CPU the convolution
    weights go to NHWC (channels_last) first: the frozen graph then runs every convolution NHWC, at
    about 0.9x the time of NCHW (both gains are measured in docs/benchmarks.md).

    Freezing is a process-wide inductor setting, read when a call first traces a graph (passing it
    in torch.compile's `options` does not reach that step). Both dynamo and inductor apply it only
    to graphs traced without gradients, so training graphs compiled elsewhere are not affected.
    """
    import torch._inductor.config

    torch._inductor.config.freezing = True
    if all(p.device.type == "cpu" for p in module.parameters()):
        module.to(memory_format=torch.channels_last)
    module.compile(dynamic=False)
    return module


# Pipeline.__call__'s diffusers-style keyword names -> GenerationSettings fields.
CALL_NAMES = {"num_steps": "steps", "guidance_scale": "scale", "negative_prompts": "negative_prompt",
              "init_images": "init_img", "masks": "mask"}


def build_text_encoder(config: TextEncoderConfig | tuple[TextEncoderConfig, ...]) -> TextEncoder | Conditioner:
    """One text tower, or SDXL's `Conditioner` for a tuple of them."""
    return Conditioner(config) if isinstance(config, tuple) else TextEncoder(config)


def check_size(height: int, width: int, factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise InputError(f"{name} must be a positive multiple of {factor}, got {value} "
                             f"(try {max(factor, round(value / factor) * factor)})")


def _unet_adapter(adapters: Sequence[tuple[Adapter, float]]) -> Adapter | None:
    """The first adapter of (adapter, weight) pairs that changes a U-Net weight, if any."""
    return next((adapter for adapter, _ in adapters if any(layer.component == "unet" for layer, _ in adapter.changes)),
                None)


class Pipeline:
    """A loaded text-to-image model: `unet`, `text_encoder`, `autoencoder`, `schedule`, `spec`.

    Each stage can be driven on its own: `text_encoder(prompts)` -> context (B, 77, D) (SDXL:
    `text_encoder.encode(...)`, see `ldm.conditioner`), `unet(x_t, t, context)` -> prediction,
    `encode(images)` / `decode(latents)` for the autoencoder with the latent scale factor applied.
    """

    def __init__(self, spec: ModelSpec, unet: UNetModel, text_encoder: TextEncoder | Conditioner,
                 autoencoder: AutoencoderKL,
                 name: str = "") -> None:
        self.spec = spec
        self.unet = unet.eval()
        self.text_encoder = text_encoder.eval()
        self.autoencoder = autoencoder.eval()
        self.schedule = NoiseSchedule(**spec.schedule)
        self.name = name or spec.family
        self.tiling: tuple[int, int] | None = None  # (tile size, overlap) in latent pixels; None = whole images
        self.lora_dir: Path | None = None  # where <lora:NAME> tags in prompts are looked up
        # Bytes of activations one batch may take (`ldm.memory`); None: what the device has free when the
        # batch starts; math.inf: no check.
        self.max_memory: float | None = None
        self.adapters = MergedAdapters({"unet": self.unet, "text_encoder": self.text_encoder})
        self._loras: list[tuple[Adapter, float]] = []  # from load_lora; prompts and settings add theirs
        self._adapter_files: dict[tuple[Path, int, int], Adapter] = {}
        self.weights_text: dict[str, str] = {}  # which weights of the file were replaced, for the PNG text
        self.embedding_files: dict[str, Path] = {}  # textual-inversion trigger word -> its file
        self._used_embeddings: list[str] = []  # the trigger words of the last batch
        self._compiled = False
        self._traced = False  # compiled and run: the weights are constants of the compiled graph
        self.compiled_unet: CompiledUNet | None = None  # compile_unet("cache" / "auto"): cached programs
        # what decides a context (see encode_context) -> contexts, most recently used last; None = no cache
        self.context_cache: OrderedDict[tuple, tuple[Encoded, Encoded | None]] | None = None
        self.context_cache_size = 0
        self._refiner: tuple[Path, Pipeline] | None = None  # the SDXL refiner last asked for, loaded
        self.precision: str | None = None  # the precision name from_checkpoint was given, if any; the refiner's too
        self.quantize_mode = "off"  # the U-Net's int8 mode (quantize_unet), one of ldm.quantize.QUANTIZE_MODES

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str = "") -> Pipeline:
        """A pipeline with freshly initialised weights (for training and tests)."""
        return cls(spec, UNetModel(spec.unet), build_text_encoder(spec.text_encoder), AutoencoderKL(spec.autoencoder),
                   name)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: str | Path | None = None, prediction: str | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                        vae: str | Path | None = None, use_ema: bool = False) -> Pipeline:
        """Load an original SD 1.x/2.x checkpoint or one of ours; `config` is an optional SD inference YAML,
        `prediction` ("eps" or "v") overrides what the checkpoint implies. `vae`: a VAE file that replaces
        the checkpoint's autoencoder (its latent scale factor stays the checkpoint's); `use_ema`: the U-Net's
        EMA weights, which full SD training checkpoints carry beside the raw ones. `dtype` may be a precision
        name ("auto", "autocast", "bf16", ...; see `ldm.precision`), resolved for this model and device."""
        state_dict, metadata = read_checkpoint(path)
        spec = detect_spec(state_dict, metadata, prediction, config)
        parts = split_state_dict(state_dict)
        ema = ema_unet(state_dict, parts["unet"])
        if use_ema and ema is None:
            raise InputError(f"{path} has no EMA weights (model_ema.*); leave out --use_ema")
        if ema is not None and not use_ema:
            warnings.warn(f"{Path(path).name} also holds EMA weights of the U-Net; --use_ema (use_ema=True) "
                          "generates with them", stacklevel=2)
        parts["unet"] = ema if use_ema else parts["unet"]
        if vae is not None:
            parts["autoencoder"] = autoencoder_file(read_checkpoint(vae)[0], vae)
        del state_dict, ema
        with torch.device("meta"):  # no random init: every weight comes from the file
            modules = UNetModel(spec.unet), build_text_encoder(spec.text_encoder), AutoencoderKL(spec.autoencoder)
        pipe = cls(spec, *modules, name=Path(path).stem)
        dtypes = None
        if isinstance(dtype, str):
            pipe.precision = dtype
            dtypes = stage_dtypes(dtype, torch.device(device), sum(p.numel() for p in pipe.unet.parameters()))
        pipe.weights_text = {**({"vae": Path(vae).name} if vae is not None else {}),
                             **({"use_ema": "True"} if use_ema else {})}
        for part, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                             ("autoencoder", pipe.autoencoder)):
            # Copied weight by weight, the file's copy of each freed once converted (`parts` holds the
            # only references): the peak is the converted model and one weight of the file.
            load_strict(module, parts.pop(part), part, vae if part == "autoencoder" and vae is not None else path,
                        device, pipe._stage_dtype(module, dtype if dtypes is None else dtypes[part]))
        return pipe

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write all weights and the spec to one .safetensors file that `from_checkpoint` reads alone."""
        if self.quantize_mode != "off":
            raise InputError(f"the U-Net is quantized ({self.quantize_mode}) and its int8 weights are not "
                             "safetensors tensors: save the pipeline before quantizing")
        return write_checkpoint(path, self.spec, self.unet.state_dict(), self.autoencoder.state_dict(),
                                self.text_encoder.state_dict(), metadata)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           modules: Sequence[torch.nn.Module] | None = None) -> Pipeline:
        """Move the stages (or `modules` of them); SDXL's autoencoder stays float32 when asked for float16, in
        which its activations overflow (diffusers' `force_upcast` for the same reason)."""
        modules = modules or (self.unet, self.text_encoder, self.autoencoder)
        if self.quantize_mode != "off" and dtype not in (None, self.dtype) and any(m is self.unet for m in modules):
            # torchao's int8 weights keep the dtype they were made from while the convolutions would change
            raise InputError(f"the U-Net is quantized ({self.quantize_mode}): choose its precision before "
                             "quantizing")
        for module in modules:
            module.to(device=device, dtype=self._stage_dtype(module, dtype))
        return self

    def _stage_dtype(self, module: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
        if module is self.autoencoder and dtype == torch.float16 and self.spec.family in SDXL_FAMILIES:
            return torch.float32
        return dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def set_attention_backend(self, backend: str, slice_size: int = DEFAULT_SLICE_SIZE) -> Pipeline:
        """Attention of the U-Net and the autoencoder: "sdpa" (default), "xformers", "sliced" or "math"."""
        for module in (self.unet, self.autoencoder):
            set_attention_backend(module, backend, slice_size)
        return self

    def enable_tiling(self, tile_size: int = 64, overlap: int = 16) -> Pipeline:
        """Encode and decode in overlapping tiles of `tile_size` latent pixels: memory is bounded by the
        tile, not the image (for large images on small machines)."""
        self.tiling = (tile_size, overlap)
        return self

    def to_channels_last(self) -> Pipeline:
        """Keep the U-Net's and the autoencoder's convolution weights in NHWC order (channels_last).
        Activations follow the weights' layout, so every convolution runs NHWC, the layout tensor cores
        want, and the attention blocks' token reshapes become views. On a CPU it was no faster for
        inference (docs/benchmarks.md), so it is opt-in."""
        for module in (self.unet, self.autoencoder):
            module.to(memory_format=torch.channels_last)
        return self

    def compile_unet(self, mode: str = "jit", cache_dir: str | Path | None = None) -> Pipeline:
        """Compiled sampling. "jit": torch.compile the U-Net in place (`compile_for_inference`); the first
        call per shape in each process is slow, and later changes to the weights are not seen.
        "cache": AOTInductor programs, one per input shape, kept in `cache_dir` (default
        `ldm.compile_cache.default_cache_dir()`): a shape the cache lacks is compiled once, for this and
        every later process; LoRAs merge as in eager mode. "auto": the cached programs where there are
        some, eager otherwise (nothing is compiled). "off": eager."""
        if mode not in ("jit", "cache", "auto", "off"):
            raise InputError(f"compile mode must be jit, cache, auto or off, got {mode!r}")
        if self.quantize_mode != "off" and mode in ("cache", "auto"):
            # The cached programs take the U-Net's weights by name as plain tensors; torchao's int8 weights
            # are tensor subclasses that export flattens into other names, so no program could use them.
            if mode == "cache":
                raise InputError("the compile cache keeps no int8 U-Nets; with --quantize use --compile jit "
                                 "(txt2img) or off")
            mode = "off"  # auto: what the cache has, which for an int8 U-Net is nothing, as with an empty cache
        self.compiled_unet = None
        if mode == "jit":
            compile_for_inference(self.unet)
            self._compiled = True
        elif mode != "off":
            self.compiled_unet = CompiledUNet(self.unet, cache_dir, build=mode == "cache")
        return self

    def quantize_unet(self, mode: str) -> Pipeline:
        """int8 Linear weights in the U-Net through torchao (`ldm.quantize`): "int8-weight", "int8-dynamic",
        or "off" (nothing). Cannot be undone. Quantize after choosing the precision (`to`) and before
        `compile_unet`. LoRAs that change the U-Net cannot be merged into int8 weights: they are refused
        while it is quantized, and quantizing is refused while some are merged."""
        check_mode(mode)
        if mode == self.quantize_mode:
            return self
        if self.quantize_mode != "off":
            raise InputError(f"the U-Net is already quantized ({self.quantize_mode}); load the checkpoint again "
                             f"for {mode}")
        if self._compiled or self.compiled_unet is not None:
            raise InputError("quantize the U-Net before compiling it (quantize_unet, then compile_unet)")
        if adapter := _unet_adapter(self.adapters.active):
            raise InputError(f"the LoRA {adapter.name} is merged into the U-Net, and LoRAs cannot be merged into "
                             "int8 weights: unload it (unload_lora) before quantizing")
        quantize_unet(self.unet, mode)
        self.quantize_mode = mode
        return self

    def _sampling_unet(self) -> UNet:
        """What the sampler calls: the cached compiled programs if on, else the U-Net."""
        if self.compiled_unet is None:
            return self.unet
        self.compiled_unet.refresh()
        return self.compiled_unet

    def read_lora(self, path: str | Path) -> Adapter:
        """A LoRA / LyCORIS file matched to this model's layers; read once while the file is unchanged."""
        path = Path(path)
        stat = path.stat() if path.is_file() else None
        key = (path.resolve(), stat.st_mtime_ns, stat.st_size) if stat else None
        if key not in self._adapter_files:
            layers = {"unet": unet_layers(self.unet), "text_encoder": text_encoder_layers(self.text_encoder)}
            weights = {"unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict()}
            self._adapter_files[key] = read_adapter(path, layers, weights, self.spec.family)
        return self._adapter_files[key]

    def load_lora(self, loras: str | Path | Sequence[str | Path | tuple[str | Path, float]],
                  weight: float = 1.0) -> Pipeline:
        """Merge LoRA / LyCORIS files into the weights: one file at `weight`, or a list of files or
        (file, weight) pairs. Replaces what an earlier call loaded; LoRAs that prompts name
        (`<lora:NAME:WEIGHT>`) or settings list are merged on top of these for their images."""
        loras = [loras] if isinstance(loras, (str, Path)) else list(loras)
        pairs = [item if isinstance(item, tuple) else (item, weight) for item in loras]
        adapters = [(self.read_lora(path), float(w)) for path, w in pairs]
        self._merge(adapters)  # first: a refused set is not kept for later batches
        self._loras = adapters
        return self

    def unload_lora(self, release: bool = False) -> Pipeline:
        """Take every merged LoRA out: the weights are the checkpoint's again, bit for bit. The buffers the
        merged weights used are kept for the next merge (as much memory as the weights LoRAs changed), unless
        `release`."""
        self._loras = []
        self._merge([])
        if release:
            self.adapters.clear(release=True)
        return self

    def _merge(self, adapters: list[tuple[Adapter, float]]) -> None:
        if self._traced and [(a.path, w) for a, w in adapters] != [(a.path, w) for a, w in self.adapters.active]:
            raise InputError("the compiled U-Net keeps the weights of its first image: load LoRAs before "
                             "generating with --compile, and keep them the same")
        if self.quantize_mode != "off" and (adapter := _unet_adapter(adapters)):
            raise InputError(f"the LoRA {adapter.name} changes the U-Net, whose weights are int8 (--quantize "
                             f"{self.quantize_mode}); LoRAs cannot be merged into int8 weights: generate without "
                             "--quantize to use it")
        self.adapters.set(adapters)
        # Files read stay cached while in use, so a batch after a batch does not read them again.
        self._adapter_files = {k: a for k, a in self._adapter_files.items() if any(a is b for b, _ in adapters)}

    def _batch_loras(self, settings: GenerationSettings) -> tuple[list[str], list[tuple[Adapter, float]]]:
        """The prompts with their <lora:...> tags removed, and every LoRA the batch uses: `load_lora`'s,
        the settings', the tags' (the same tags in every prompt of a batch)."""
        stripped = [split_lora_tags(prompt) for prompt in settings.prompts()]
        tags = stripped[0][1]
        if any(other != tags for _, other in stripped):
            raise InputError("the prompts of one batch name different <lora:...> tags; generate them in separate "
                             "batches")
        adapters = [*self._loras, *((self.read_lora(path), w) for path, w in map(parse_lora_spec, settings.lora)),
                    *((self.read_lora(find_adapter(name, self.lora_dir)), w) for name, w in tags)]
        return [prompt for prompt, _ in stripped], adapters

    def load_embeddings(self, folder: str | Path) -> Pipeline:
        """Textual-inversion files under `folder` (`ldm.embeddings`), each triggered by its file name in a
        prompt; replaces earlier ones. Files made for another text encoder are skipped with a warning."""
        towers = self.embedding_towers()
        found = read_embeddings(Path(folder), {key: tower.config.width for key, tower in towers.items()})
        for key, tower in towers.items():
            tower.set_embeddings({word: vectors[key] for word, (vectors, _) in found.items()})
        self.embedding_files = {word: path for word, (_, path) in found.items()}
        return self

    def embedding_towers(self) -> dict[str, TextEncoder]:
        """The text towers by the key of their vectors in embedding files: "" for SD 1.x / 2.x; SDXL's
        `clip_l` (CLIP ViT-L) and `clip_g` (bigG, the tower with the projection head)."""
        if not isinstance(self.text_encoder, Conditioner):
            return {"": self.text_encoder}
        return {"clip_g" if tower.config.output_dim else "clip_l": tower for tower in self.text_encoder.embedders}

    def model_text(self) -> dict[str, str]:
        """What, beyond the checkpoint, changed the last images: replaced weights, LoRAs and the embeddings
        their prompts used (names and short sha256), for their PNG text."""
        text = dict(self.weights_text)
        if self.adapters.active:
            text["lora_hashes"] = ", ".join(f"{a.name}: {a.short_hash}" for a, _ in self.adapters.active)
        if self._used_embeddings:
            text["embeddings"] = ", ".join(f"{word}: {sha256_file(self.embedding_files[word])[:12]}"
                                           for word in self._used_embeddings)
        return text

    def enable_context_cache(self, size: int = 32) -> Pipeline:
        """Keep the contexts of the last `size` distinct prompt lists, so that a repeated prompt is not
        encoded again (a server's repeated requests). LoRAs and embeddings are part of the key; other
        changes to the text encoder's weights must not happen while it is on."""
        self.context_cache, self.context_cache_size = OrderedDict(), size
        return self

    def encode_context(self, prompts: Sequence[str], negative_prompts: Sequence[str], guidance_scale: float,
                       clip_skip: int | None = None) -> tuple[Encoded, Encoded | None]:
        """(context (B, N, D), pooled text) of `prompts` and, unless `guidance_scale` is 1 (no guidance), of
        `negative_prompts` (one per prompt), in the pipeline's dtype. Pooled text (B, P) is SDXL's, else None.

        The SDXL base, like its reference pipeline, conditions on zeros where the negative prompt is empty.
        """
        # What else decides the text encoder's output: its merged LoRAs and its embeddings.
        key = (tuple(prompts), tuple(negative_prompts), guidance_scale != 1, clip_skip,
               tuple((adapter.path, weight) for adapter, weight in self.adapters.active),
               tuple(self.embedding_files.items()))
        if self.context_cache is not None and key in self.context_cache:
            self.context_cache.move_to_end(key)
            return self.context_cache[key]
        negative_prompts = list(negative_prompts) if guidance_scale != 1 else None
        if isinstance(self.text_encoder, Conditioner):
            cond, uncond = self.text_encoder.encode(list(prompts), negative_prompts, clip_skip)
            if uncond is not None and self.spec.family == "sdxl":
                keep = torch.tensor([text != "" for text in negative_prompts], device=uncond[0].device)
                uncond = tuple(torch.where(keep.view(-1, *[1] * (x.ndim - 1)), x, 0) for x in uncond)
        else:
            cond, uncond = encode_prompts_pooled(self.text_encoder, list(prompts), negative_prompts, clip_skip,
                                                 pooled=False)

        def cast(encoded: Encoded) -> Encoded:
            return tuple(None if x is None else x.to(self.dtype) for x in encoded)

        contexts = cast(cond), None if uncond is None else cast(uncond)
        if self.context_cache is not None:
            self.context_cache[key] = contexts
            if len(self.context_cache) > self.context_cache_size:
                self.context_cache.popitem(last=False)
        return contexts

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) (posterior mean)."""
        images = images.to(self.autoencoder_dtype)
        if self.tiling is None:
            posterior = self.autoencoder.encode(images)
        else:
            factor = self.autoencoder.config.downsampling_factor
            posterior = tiled_encode(self.autoencoder, images, *(n * factor for n in self.tiling))
        return posterior.mode() * self.autoencoder.scale_factor

    @property
    def autoencoder_dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        # Channels-last: oneDNN convolutions copy NCHW inputs into a blocked layout first, which at full
        # resolution is the decode's peak memory (measured in docs/benchmarks.md).
        z = (latents / self.autoencoder.scale_factor).to(self.autoencoder_dtype)
        z = z.contiguous(memory_format=torch.channels_last)
        images = self.autoencoder.decode(z) if self.tiling is None else tiled_decode(self.autoencoder, z, *self.tiling)
        if images.dtype == torch.float16 and self.spec.family in SDXL_FAMILIES and not images.isfinite().all():
            raise InputError("the SDXL autoencoder overflowed in float16: keep it in float32 or bfloat16 (the "
                             "pipeline does unless the autoencoder is cast by hand)")
        return images.clamp(-1, 1)

    @property
    def is_inpainting(self) -> bool:
        """An SD 2 inpainting U-Net: latents + mask + masked-image latents in (4 + 1 + 4 channels)."""
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels + 1

    def __call__(self, prompts: str | Sequence[str], *, latents: torch.Tensor | None = None,
                 output_type: str = "pil", progress: bool = True, **settings: Any) -> list[Image.Image] | torch.Tensor:
        """`generate` with the settings as keyword arguments: one image per prompt, e.g.
        `pipe(["a fox"], num_steps=20, guidance_scale=7.5, seed=42, sampler="dpmpp_2m")`.

        Takes every `GenerationSettings` field, and the diffusers-style names `num_steps` (steps),
        `guidance_scale` (scale), `negative_prompts` (negative_prompt), `init_images` (init_img) and
        `masks` (mask).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompts given")
        names = {CALL_NAMES.get(name, name): value for name, value in settings.items()}
        if unknown := sorted(set(names) - set(FIELDS) | {"prompt", "batch_size"} & set(names)):
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; the prompts set prompt and batch_size, "
                             f"the others are {', '.join(sorted(set(FIELDS) - {'prompt', 'batch_size'}))}")
        batch = GenerationSettings(prompt=tuple(prompts), batch_size=len(prompts), **names)
        return self.generate(batch, latents=latents, output_type=output_type, progress=progress)

    @torch.no_grad()
    def generate(self, settings: GenerationSettings, *, latents: torch.Tensor | None = None,
                 output_type: str = "pil", progress: bool = True, callback: StepCallback | None = None
                 ) -> list[Image.Image] | torch.Tensor:
        """Generate `settings.batch_size` images.

        `latents` (B, 4, h, w), if given, replace the seeded initial noise. Prompts may carry
        `(text:1.3)` weights and be longer than the text encoder's context (see `ldm.prompts`).
        img2img: `settings.init_img` (a file, a PIL image or a tensor (1 or B, 3, H, W) in [-1, 1]) sets
        the size; inpainting: also `settings.mask` (1 or B, 1, H, W) in [0, 1], 1 where to repaint. Both
        work with every sampler.

        `callback(step_index, x_t)` runs after every sampling step (see `ldm.sampling`); an exception it
        raises stops the run there (the server's interrupt).

        Returns PIL images, or with `output_type="tensor"` images (B, 3, H, W) in [-1, 1], or with
        "latent" the latents.
        """
        if output_type not in ("pil", "tensor", "latent"):
            raise InputError(f"output_type must be 'pil', 'tensor' or 'latent', got {output_type!r}")
        batch_size = settings.batch_size
        init_images, masks = self._init_images(settings)
        if self.is_inpainting and masks is None:
            raise InputError(f"{self.name} is an inpainting model: pass an init image and a mask")
        height, width = self._size(settings, init_images)
        self._check_model_settings(settings, init_images is not None)
        self._check_memory(batch_size, height, width, settings.scale != 1)

        # 1. Prompts -> context; the negative (by default empty) prompt is the unconditional context. The
        #    batch's LoRAs are merged into the weights first.
        prompts, adapters = self._batch_loras(settings)
        self._merge(adapters)
        used = set().union(*map(self.text_encoder.trigger_words, [*prompts, *settings.negative_prompts()]))
        self._used_embeddings = [word for word in self.embedding_files if word in used]
        encoded = self.encode_context(prompts, settings.negative_prompts(), settings.scale, settings.clip_skip)
        # 2. Initial noise in float32 from one CPU generator per image, which then also draws
        #    that image's sampler noise (eta > 0): image k is reproducible alone, on any device.
        factor = self.autoencoder.config.downsampling_factor
        shape = (batch_size, self.unet.config.out_channels, height // factor, width // factor)
        generators = [torch.Generator().manual_seed(s) for s in settings.seeds()]
        if latents is None:
            noise = randn(shape, generators, self.device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise InputError(f"initial latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            noise = latents.to(self.device, torch.float32)
        # 3. Denoise with guidance, from noise or, for img2img, from the init images' latents noised to
        #    the level of the first step that `strength` reruns.
        unet, start, blend = self._sampling_unet(), FROM_NOISE, None
        if init_images is not None:
            unet, x0, blend = self._start_from_images(init_images, masks, batch_size)
            start = StartPoint(x0, start_step(settings.steps, settings.strength), blend)
        denoiser = self._guidance(unet, settings, *encoded, height, width)
        if settings.refiner is not None:
            refiner = self._load_refiner(settings.refiner)
            encoded = refiner.encode_context(prompts, settings.negative_prompts(), settings.scale, settings.clip_skip)
            denoiser = RefinerSwitch(denoiser, refiner._guidance(refiner.unet, settings, *encoded, height, width),
                                     switch_timestep(settings.refiner_switch, self.schedule.num_timesteps))
        z = sample(settings.sampler, denoiser, noise, self.schedule, settings.steps, eta=settings.eta,
                   karras=settings.karras, stiffness=denoiser.stiffness, generator=generators,
                   parameterization=self.spec.parameterization, progress=progress, start=start,
                   callback=callback)
        self._traced = self._compiled
        if blend is not None:
            z = blend(z)
        if output_type == "latent":
            return z
        # 4. Latents -> images.
        images = self.decode(z.to(self.dtype))
        return images if output_type == "tensor" else to_pil(images)

    def _guidance(self, unet: UNet, settings: GenerationSettings, cond: Encoded, uncond: Encoded | None,
                  height: int, width: int) -> ClassifierFreeGuidance:
        """Guidance of `unet` by the encoded prompts; for SDXL with the vectors of pooled text and sizes."""
        vectors: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if self.spec.family in SDXL_FAMILIES:
            names = SDXL_FAMILIES[self.spec.family]
            values = {"original_size": settings.original_size or (height, width),
                      "crop_coords": settings.crop_coords or (0, 0),
                      "target_size": settings.target_size or (height, width),
                      "aesthetic_score": (6.0 if settings.aesthetic_score is None else settings.aesthetic_score,)}
            negative_score = 2.5 if settings.negative_aesthetic_score is None else settings.negative_aesthetic_score

            def vector(pooled: torch.Tensor, values: dict) -> torch.Tensor:
                sizes = micro_conditioning(names, values, len(pooled)).to(pooled.device)
                return torch.cat([pooled.float(), sizes], dim=-1).to(self.dtype)

            vectors = (vector(cond[1], values),
                       None if uncond is None else vector(uncond[1], {**values, "aesthetic_score": (negative_score,)}))
        return ClassifierFreeGuidance(unet, cond[0], None if uncond is None else uncond[0], settings.scale,
                                      settings.guidance_rescale, *vectors)

    def _check_model_settings(self, settings: GenerationSettings, from_image: bool) -> None:
        """InputError for settings this model does not take: SDXL's micro-conditioning and refiner elsewhere,
        a refiner used as a base."""
        sdxl_only = [name for name in ("original_size", "crop_coords", "target_size", "aesthetic_score",
                                       "negative_aesthetic_score", "refiner") if getattr(settings, name) is not None]
        if sdxl_only and self.spec.family not in SDXL_FAMILIES:
            raise InputError(f"{', '.join(sdxl_only)} appl{'ies' if len(sdxl_only) == 1 else 'y'} to SDXL models "
                             f"only; {self.name} is {self.spec.family}")
        if self.spec.family == "sdxl_refiner":
            if settings.refiner is not None:
                raise InputError(f"{self.name} is itself an SDXL refiner: pass the SDXL base as the checkpoint "
                                 "and this file as the refiner")
            if not from_image:
                raise InputError(f"{self.name} is an SDXL refiner: it refines an image (pass an init image) or "
                                 "finishes an SDXL base's run (the base as the checkpoint, this file as the refiner)")

    def _load_refiner(self, path: str | Path) -> Pipeline:
        """The SDXL refiner at `path`, on this pipeline's device and in its precision; the last one stays loaded."""
        path = Path(path)
        if self._refiner is None or self._refiner[0] != path.resolve():
            self._refiner = None  # never two refiners in memory
            refiner = Pipeline.from_checkpoint(path, device=self.device, dtype=self.precision or self.dtype)
            if refiner.spec.family != "sdxl_refiner":
                raise InputError(f"{path} is not an SDXL refiner ({refiner.spec.family}); pass an SDXL refiner "
                                 "checkpoint (one text encoder, conditioner.embedders.0.model.*)")
            if refiner.unet.config.in_channels != self.unet.config.out_channels:
                raise InputError(f"{path} works on {refiner.unet.config.in_channels}-channel latents, this base on "
                                 f"{self.unet.config.out_channels}")
            self._refiner = (path.resolve(), refiner)
        return self._refiner[1]

    def _init_images(self, settings: GenerationSettings) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The init images (1 or B, 3, H, W) in [-1, 1] and masks (1 or B, 1, H, W) in [0, 1] as tensors,
        checked against each other and the batch; None where not given."""
        init_images, masks = settings.init_img, settings.mask
        if init_images is None:
            return None, None
        if not isinstance(init_images, torch.Tensor):
            init_images = load_image(init_images, "RGB") * 2 - 1
        if masks is not None and not isinstance(masks, torch.Tensor):
            masks = load_image(masks, "L")
        batch_size = settings.batch_size
        if init_images.ndim != 4 or init_images.shape[1] != 3 or init_images.shape[0] not in (1, batch_size):
            raise InputError(f"init images must be (1 or {batch_size}, 3, H, W), got {tuple(init_images.shape)}")
        if masks is not None and (masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] not in (1, batch_size)
                                  or masks.shape[-2:] != init_images.shape[-2:]):
            raise InputError(f"masks must be (1 or {batch_size}, 1, {init_images.shape[-2]}, {init_images.shape[-1]})"
                             f" like the init image, got {tuple(masks.shape)}; give a mask of the image's size")
        return init_images, masks

    def _size(self, settings: GenerationSettings, init_images: torch.Tensor | None) -> tuple[int, int]:
        """(height, width) of the images: the init images' if given (the settings may only repeat it),
        else the settings' or the model's; InputError unless sides are multiples of the autoencoder's factor."""
        factor = self.autoencoder.config.downsampling_factor
        if init_images is None:
            height = self.spec.image_size if settings.height is None else settings.height
            width = self.spec.image_size if settings.width is None else settings.width
            check_size(height, width, factor)
            return height, width
        height, width = init_images.shape[-2:]
        if height % factor or width % factor:
            raise InputError(f"the init image is {width}x{height}; its sides must be multiples of "
                             f"{factor} (crop or resize it)")
        if settings.height not in (None, height) or settings.width not in (None, width):
            raise InputError(f"the init image is {width}x{height} but {settings.width}x{settings.height} was "
                             "asked for; resize the image or leave the size out")
        return height, width

    def _check_memory(self, batch_size: int, height: int, width: int, guidance: bool) -> None:
        """InputError when the batch's activations (`ldm.memory.estimate_memory`) exceed `max_memory`."""
        limit = available_memory(self.device) if self.max_memory is None else self.max_memory
        estimate = estimate_memory(self.unet.config, self.autoencoder.config, batch_size, height, width, guidance,
                                   self.dtype.itemsize, None if self.tiling is None else self.tiling[0])
        if limit is None or estimate.peak <= limit:
            return
        where = f"free on {self.device.type}" if self.max_memory is None else "set as max_memory"
        decoding = estimate.decode > estimate.unet
        tiles = ", decode in tiles (--vae_tile_size 64, Pipeline.enable_tiling)" if decoding and not self.tiling else ""
        raise InputError(f"a batch of {batch_size} {width}x{height} image{'s' if batch_size > 1 else ''} needs about "
                         f"{format_bytes(estimate.peak)} for {'decoding' if decoding else 'sampling'}, more than the "
                         f"{format_bytes(limit)} {where}; make fewer or smaller images{tiles}, or raise the limit "
                         "(--max_memory GIB, Pipeline.max_memory) if it fits anyway")

    def _start_from_images(self, init_images: torch.Tensor, masks: torch.Tensor | None, batch_size: int
                           ) -> tuple[UNet, torch.Tensor, LatentBlend | None]:
        """What sampling from init images needs: the U-Net to guide (an SD 2 inpainting U-Net sees the mask
        and the masked image), the init images' latents (B, 4, h, w) float32, and for inpainting with a
        plain U-Net the `LatentBlend` that keeps the unmasked region."""
        init_images = init_images.to(self.device, self.dtype).expand(batch_size, -1, -1, -1)
        x0 = self.encode(init_images).float()
        unet = self._sampling_unet()
        if masks is None:
            return unet, x0, None
        masks = masks.to(self.device, self.dtype).expand(batch_size, -1, -1, -1)
        small_masks = latent_masks(masks, x0.shape[-2:])
        if self.is_inpainting:
            return InpaintingUNet(unet, small_masks, self.encode(masked_images(init_images, masks))), x0, None
        return unet, x0, LatentBlend(x0, small_masks)
