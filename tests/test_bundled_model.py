"""The bundled shapes-v1 model: it ships, is small, is the default of txt2img, and follows prompts.

Prompt following is judged by the pixel-rule attribute checker (ldm/shapes/checker.py), which is
tested on the dataset's own renderings in tests/test_shapes.py, independently of any model. A missing
weights file fails these tests: it is part of the product, not an optional extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.generate import BUNDLED_CHECKPOINT
from ldm.pipeline import Pipeline
from ldm.shapes.checker import check, parse_caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import txt2img  # noqa: E402

# Every value of every attribute at least once (the held-out pairs excluded).
PROMPTS = [
    "a large red circle in the top left on a black background",
    "a small blue square in the center on a white background",
    "a large green triangle in the bottom right on a gray background",
    "a large yellow square in the top right on a black background",
    "a small cyan circle in the bottom left on a white background",
    "a large pink triangle in the center on a black background",
    "a large orange circle in the top left on a gray background",
    "a small purple square in the bottom right on a gray background",
    "a small red triangle in the top right on a white background",
    "a large blue circle in the bottom left on a black background",
    "a small green square in the top left on a white background",
    "a large yellow circle in the center on a gray background",
    "a small cyan triangle in the bottom right on a black background",
    "a large pink square in the top right on a white background",
    "a small orange triangle in the bottom left on a gray background",
    "a large purple circle in the center on a white background",
]
# The card (ldm/weights/MODEL_CARD.md) measures 98 % of canonical val captions fully right, and the shipped
# file gets 16 of these 16 on the development machine (v7, at 89 %: 14). Three in four leaves room for
# another platform's last-bit differences flipping a few images, but not for a model that ignores its
# prompts: one that draws a random sample of the dataset gets all five attributes of a caption right in 1
# of 720 images (3 x 8 x 2 x 5 x 3 values, about).
MIN_ALL_CORRECT = 3 * len(PROMPTS) // 4


@pytest.fixture(scope="module")
def bundled() -> Pipeline:
    assert BUNDLED_CHECKPOINT.is_file(), f"the bundled model is missing: {BUNDLED_CHECKPOINT}"
    return Pipeline.from_checkpoint(BUNDLED_CHECKPOINT)


def test_bundled_model_is_small_and_has_its_card():
    size_mb = BUNDLED_CHECKPOINT.stat().st_size / 2**20
    assert size_mb <= 30, f"{size_mb:.1f} MB"
    card = (BUNDLED_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    for must in ("scripts/train_shapes_model.sh", "seed", "PSNR", "guidance"):
        assert must in card


def test_bundled_model_follows_prompts(bundled):
    images = bundled(PROMPTS, num_steps=50, guidance_scale=5.0, seed=0, progress=False)
    results = [check(image, parse_caption(prompt)) for prompt, image in zip(PROMPTS, images, strict=True)]
    wrong = {prompt: [k for k, ok in r.items() if not ok] for prompt, r in zip(PROMPTS, results, strict=True)
             if not all(r.values())}
    assert len(PROMPTS) - len(wrong) >= MIN_ALL_CORRECT, wrong


def test_txt2img_uses_the_bundled_model_by_default(bundled, tmp_path, capsys):
    prompt = PROMPTS[0]
    txt2img.main(["--prompt", prompt, "--outdir", str(tmp_path), "--seed", "3"])
    written = sorted(tmp_path.glob("*.png"))
    assert len(written) == 1
    image = Image.open(written[0])
    expected = bundled([prompt], num_steps=50, guidance_scale=7.5, seed=3, progress=False)[0]
    assert image.size == (64, 64)
    assert image.tobytes() == expected.convert("RGB").tobytes()
    assert image.text["model"] == BUNDLED_CHECKPOINT.stem
