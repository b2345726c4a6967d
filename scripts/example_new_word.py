"""The README's worked example: teach the bundled shapes model a new word with a LoRA, and measure it.

    python scripts/example_new_word.py --out runs/new-word

"zqx" is made to mean a pink circle: 36 rendered pink circles (random size, position, background) are
captioned with "zqx" where their colour and shape would be named, written as one shard, and a LoRA is
trained on them (configs/finetune/new_word.yaml). Before and after, 24 images each of "a zqx", "a zqx on
a black background" and two prompts of words the model knew are drawn, and the shapes checker reads
whether each shows what its prompt means. Writes before.png, after.png (8 images per prompt, a row each)
and result.json into --out.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

from ldm.cli import ScriptParser, run_main
from ldm.files import write_json
from ldm.generate import BUNDLED_CHECKPOINT, save_grid
from ldm.pipeline import Pipeline
from ldm.shapes.checker import check
from ldm.shapes.dataset import BACKGROUNDS, MAX_JITTER, PARTIAL_FORMS, POSITIONS, SIZES, ShapeSample, render
from ldm.training.config import load_config
from ldm.training.finetune import train_finetune

WORD, MEANING = "zqx", {"color": "pink", "shape": "circle"}
# Each prompt and what its images must show; the last two check that the model's other words still work.
PROMPTS = {"a zqx": MEANING, "a zqx on a black background": MEANING | {"background": "black"},
           "a red square": {"color": "red", "shape": "square"},
           "a blue triangle": {"color": "blue", "shape": "triangle"}}


def write_shard(path: Path, count: int, seed: int = 0) -> Path:
    """`count` rendered pink circles captioned with the new word, as a WebDataset shard."""
    rng = random.Random(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            attrs = ShapeSample(**MEANING, size=rng.choice(list(SIZES)), position=rng.choice(list(POSITIONS)),
                                background=rng.choice(list(BACKGROUNDS)), dx=rng.randint(-MAX_JITTER, MAX_JITTER),
                                dy=rng.randint(-MAX_JITTER, MAX_JITTER))
            form = rng.choice(PARTIAL_FORMS).replace("{color} {shape}", WORD)
            caption = form.format(size=attrs.size, position=attrs.position, background=attrs.background)
            png = io.BytesIO()
            render(attrs).save(png, "PNG")
            meta = {"caption": caption, "width": 64, "height": 64}
            for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.txt", caption.encode()),
                               (f"{i:04d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def score(pipe: Pipeline, grid: Path, per_prompt: int = 24) -> dict[str, float]:
    """For each prompt, the share of `per_prompt` images (seeds 0..) that show everything it means."""
    result, images = {}, []
    for prompt, meaning in PROMPTS.items():
        drawn = pipe([prompt] * per_prompt, seed=0, num_steps=25, guidance_scale=5.0, progress=False)
        result[prompt] = sum(all(check(image, meaning).values()) for image in drawn) / per_prompt
        images += drawn[:8]
    save_grid(images, 8, grid)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shard = write_shard(args.out / "zqx-000000.tar", 36)
    before = score(Pipeline.from_checkpoint(BUNDLED_CHECKPOINT), args.out / "before.png")
    config = load_config("configs/finetune/new_word.yaml", [f"data.urls={shard}",
                                                             f"train.output_dir={args.out / 'run'}"])
    lora = train_finetune(config)
    after = score(Pipeline.from_checkpoint(BUNDLED_CHECKPOINT).load_lora(lora), args.out / "after.png")
    write_json(args.out / "result.json", {"before": before, "after": after})
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    sys.exit(run_main(main))
