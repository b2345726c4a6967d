"""Before / after grid of autoencoders on small shapes-v1 shapes, zoomed in (the model card's figure).

    python scripts/compare_decoders.py --ckpt ldm/weights/shapes-v1.safetensors \
        --vae v8-decoder.safetensors --vae runs/shapes-decoder-gan/autoencoder.safetensors --out grid.png

Columns: the first small shapes of shapes-v1 `val`, each cropped around its box. Rows: the dataset's
rendering; each VAE's reconstruction of it; then each VAE's decoding of the same generated latents (the
checkpoint's U-Net, the sample's canonical caption, guidance 5, 50 DDIM steps, image k from seed k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from ldm.cli import ScriptParser, run_main
from ldm.data.loader import to_tensor
from ldm.errors import InputError
from ldm.files import check_output_folder
from ldm.generate import save_grid
from ldm.images import to_pil
from ldm.pipeline import Pipeline
from ldm.sd_checkpoint import autoencoder_file
from ldm.shapes.dataset import POSITIONS, canonical_caption, render, sample_attributes
from ldm.weights_io import load_strict, read_checkpoint

CROP = 24  # px around a small shape's 16 px box, before zooming


def crop(image: Image.Image, sample, zoom: int) -> Image.Image:
    x, y = POSITIONS[sample.position]
    x, y = x + sample.dx, y + sample.dy
    box = (x - CROP // 2, y - CROP // 2, x + CROP // 2, y + CROP // 2)
    return image.crop(box).resize((CROP * zoom, CROP * zoom), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="pipeline checkpoint whose U-Net draws the latents")
    p.add_argument("--vae", type=Path, action="append", required=True, help="a VAE file to compare (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="the grid (.png)")
    p.add_argument("--num_shapes", type=int, default=12)
    p.add_argument("--zoom", type=int, default=4)
    args = p.parse_args(argv)
    if args.num_shapes < 1 or args.zoom < 1:
        raise InputError(f"--num_shapes and --zoom must be >= 1, got {args.num_shapes} and {args.zoom}")
    for vae in args.vae:
        if not vae.is_file():
            raise InputError(f"VAE not found: {vae} (pass an existing .safetensors or .ckpt file)")
    check_output_folder(args.out.parent, "--out")
    samples = [sample for sample in (sample_attributes("val", k)[0] for k in range(10 * args.num_shapes))
               if sample.size == "small"][: args.num_shapes]
    pipe = Pipeline.from_checkpoint(args.ckpt)
    captions = [canonical_caption(sample) for sample in samples]
    with torch.no_grad():
        latents = torch.cat([pipe([caption], num_steps=50, guidance_scale=5.0, seed=k, output_type="latent",
                                  progress=False) for k, caption in enumerate(captions)])
        renders = [render(sample) for sample in samples]
        images = torch.stack([to_tensor(image) for image in renders])
        reconstructed, generated = [], []
        for vae in args.vae:
            # Decoded in the pipeline's precision, as txt2img --vae does, whatever the file stores.
            weights = autoencoder_file(read_checkpoint(vae)[0], vae)
            load_strict(pipe.autoencoder, weights, "autoencoder", vae, dtype=pipe.dtype)
            reconstructed.append(to_pil(pipe.decode(pipe.encode(images))))
            generated.append(to_pil(pipe.decode(latents)))
    rows = [renders, *reconstructed, *generated]
    cells = [crop(image, sample, args.zoom) for row in rows for image, sample in zip(row, samples, strict=True)]
    save_grid(cells, len(samples), args.out)
    print(args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
