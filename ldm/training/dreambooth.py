"""DreamBooth (Ruiz et al. 2022): one instance prompt for every instance image, and prior preservation.

Fine-tuning on a few images of one subject under a prompt like "a sks dog" teaches the subject, but
also drifts the class ("a dog") towards it. Prior preservation trains, beside each instance batch, on
images the base model itself draws for `class_prompt`, with weight `prior_loss_weight`, so the model
keeps what it knew of the class. Those class images are made once, into `class_dir`, and reused: a
later run generates only what is missing to reach `num_class_images`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ldm.files import atomic_write
from ldm.pipeline import Pipeline
from ldm.training.config import at_least, require


@dataclass
class DreamBoothConfig:
    """The `dreambooth:` section of a fine-tuning YAML (off while `instance_prompt` is empty)."""

    instance_prompt: str = ""  # replaces every instance image's caption, e.g. "a photo of sks dog"
    class_prompt: str = ""  # prior preservation when set, e.g. "a photo of a dog"
    num_class_images: int = 100
    class_dir: str | None = None  # where the class images are kept; default: the run folder's class_images/
    prior_loss_weight: float = 1.0
    class_steps: int = 25  # sampler steps and guidance scale of the class images
    class_guidance_scale: float = 5.0


def check_dreambooth_config(dcfg: DreamBoothConfig) -> None:
    require(not dcfg.class_prompt or bool(dcfg.instance_prompt), "dreambooth.instance_prompt",
            "set when dreambooth.class_prompt is (prior preservation is DreamBooth's)", dcfg.instance_prompt)
    at_least(dcfg, "dreambooth", 1, "num_class_images", "class_steps")
    at_least(dcfg, "dreambooth", 0, "prior_loss_weight", "class_guidance_scale")


def class_images(base: Callable[[], Pipeline], dcfg: DreamBoothConfig, folder: Path, batch_size: int,
                 progress: bool = True) -> list[Path]:
    """The first `num_class_images` class images in `folder`, generated where missing by the pipeline that
    `base()` loads (only then).

    Image i is drawn from seed i, so the set does not depend on how many earlier runs made: a folder
    filled in two runs holds the images one run would have made. Each file is written whole (renamed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class-{i:05d}.png" for i in range(dcfg.num_class_images)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    pipe = base() if missing else None
    with tqdm(total=len(missing), desc="class images", disable=not progress or not missing) as bar:
        for start in range(0, len(missing), batch_size):
            seeds = missing[start:start + batch_size]
            images = pipe([dcfg.class_prompt] * len(seeds), seed=tuple(seeds), num_steps=dcfg.class_steps,
                          guidance_scale=dcfg.class_guidance_scale, progress=False)
            for i, image in zip(seeds, images, strict=True):
                with atomic_write(paths[i]) as tmp:
                    image.save(tmp, "PNG")
            bar.update(len(seeds))
    return paths
