"""Serve the AUTOMATIC1111 web API and a web page: python scripts/serve.py, then open http://127.0.0.1:7860/.

Clients of A1111's API (webuiapi, Open WebUI, SillyTavern, Krita and GIMP plug-ins, ...) work unchanged
against it; docs/server.md lists the routes, fields and limits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli import COMPILE_MODES, ScriptParser, resolve_device, run_main
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT
from ldm.precision import PRECISION_NAMES
from ldm.quantize import QUANTIZE_MODES
from ldm.server.a1111 import Limits
from ldm.server.app import ServerConfig, create_app


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                   "then set --api-auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--ckpt", type=Path, default=BUNDLED_CHECKPOINT, help="the checkpoint loaded at start "
                   "(default: the bundled shapes-v1 model)")
    p.add_argument("--models_dir", type=Path, help="a folder of further .safetensors / .ckpt checkpoints to offer")
    p.add_argument("--lora_dir", type=Path, help="folder of LoRA files that <lora:NAME:WEIGHT> in prompts names "
                   "(listed at /sdapi/v1/loras)")
    p.add_argument("--embeddings_dir", type=Path, help="folder of textual-inversion embeddings, triggered by "
                   "their file names (listed at /sdapi/v1/embeddings)")
    p.add_argument("--api-auth", "--api_auth", dest="api_auth", metavar="USER:PASS",
                   help="require HTTP basic auth with this user name and password on every route")
    p.add_argument("--max_queue", type=int, default=16, help="jobs that may wait; more are refused with 503")
    p.add_argument("--max_size", type=int, default=Limits.max_side, help="largest image side in pixels")
    p.add_argument("--max_steps", type=int, default=Limits.max_steps, help="most sampling steps per image")
    p.add_argument("--max_images", type=int, default=Limits.max_images, help="most images per request "
                   "(batch_size * n_iter)")
    p.add_argument("--max_body_mb", type=float, default=32, help="largest request body in MB")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="auto",
                   help="auto = fp16 on GPU; on a CPU bf16 for large models where it has bf16 matrix instructions, "
                   "else fp32; autocast = fp16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="off", help="int8 Linear weights in the U-Net "
                   "through torchao (pip install torchao; docs/generation.md): int8-weight, or int8-dynamic (int8 "
                   "activations too); off (default): as loaded")
    p.add_argument("--compile", nargs="?", const="cache", default="auto", choices=COMPILE_MODES,
                   help="compiled U-Net programs kept in the compile cache (docs/generation.md): cache (the flag "
                   "alone) compiles each new image shape once, minutes, for this and later starts; auto (default) "
                   "uses those the cache has, eager otherwise; off: eager")
    return p


def parse_config(argv: list[str] | None) -> tuple[argparse.Namespace, ServerConfig]:
    args = build_parser().parse_args(argv)
    auth = None
    if args.api_auth is not None:
        user, colon, password = args.api_auth.partition(":")
        if not colon or not user or not password:
            raise InputError(f"--api-auth must be USER:PASS, got {args.api_auth!r}")
        auth = (user, password)
    for flag in ("port", "max_queue", "max_size", "max_steps", "max_images", "max_body_mb"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.ckpt.is_file():
        raise InputError(f"checkpoint not found: {args.ckpt} (pass one with --ckpt PATH)")
    for flag in ("models_dir", "lora_dir", "embeddings_dir"):
        if getattr(args, flag) is not None and not getattr(args, flag).is_dir():
            raise InputError(f"--{flag} {getattr(args, flag)} is not a folder")
    device = resolve_device(args.device)
    return args, ServerConfig(checkpoint=args.ckpt, models_dir=args.models_dir, lora_dir=args.lora_dir,
                              embeddings_dir=args.embeddings_dir, auth=auth, max_queue=args.max_queue,
                              max_body_bytes=int(args.max_body_mb * 2**20),
                              limits=Limits(args.max_size, args.max_steps, args.max_images), device=device,
                              dtype=args.precision, compile=args.compile,
                              quantize=args.quantize)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args, config = parse_config(argv)
    app = create_app(config)
    print(f"serving {config.checkpoint.name} on http://{args.host}:{args.port}/ (A1111 API at /sdapi/v1)",
          flush=True)
    # A stop (Ctrl-C) waits 5 s for running requests, then cancels them and the queue.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    sys.exit(run_main(main))
