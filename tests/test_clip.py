"""Tests for ldm.clip and ldm.training.clip: towers, loss, positives, training run, export and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import TextTransformer
from safetensors.torch import load_file
from torchvision.transforms import Normalize

from ldm.cli import run_main
from ldm.clip import ClipConfig, SmallCLIP, VisionConfig, clip_score, contrastive_loss, load_clip
from ldm.config import config_dict
from ldm.data.loader import make_loader, shapes_dataset
from ldm.errors import InputError
from ldm.shapes.dataset import HELDOUT_PAIRS, VOCABULARY, write_shards
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.training.clip import canonical_samples, caption_positives, hard_negative_captions, train_clip
from ldm.training.common import load_stage
from ldm.weights_io import save_module
from tests.conftest import write_tar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_clip as train_clip_script  # noqa: E402

PROMPTS = ["a red circle", "a small blue square in the center on a white background", "a green triangle"]
TINY = {
    "embed_dim": 16,
    "text": {"width": 32, "layers": 2, "heads": 2, "context_length": 16},
    "vision": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Models this small gain nothing from intra-op threads, and on a busy machine the threads'
    # synchronisation made the training test 20x slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _tiny_clip(seed: int = 0) -> SmallCLIP:
    torch.manual_seed(seed)
    model = SmallCLIP(ClipConfig.from_dict(TINY))
    # LayerNorms start as the identity; perturb them so a misplaced or skipped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _shapes_batch(num_samples: int) -> dict:
    return next(iter(make_loader(shapes_dataset("train", 64, stop=num_samples), num_samples)))


def test_exported_text_tower_loads_strictly_and_gives_the_same_context(tmp_path):
    model = _tiny_clip().eval()
    path = save_module(tmp_path / "text_encoder.safetensors", model.text, "text_encoder",
                       config_dict(model.config.text))
    loaded = load_stage(path, "text_encoder")
    assert isinstance(loaded, TextEncoder)
    assert loaded.state_dict().keys() == model.text.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.text.state_dict().items())
    with torch.no_grad():
        inside = model.text(PROMPTS)
    assert inside.shape == (3, 16, 32)
    # Equal weights, yet not always equal bits: on some CPUs the masked attention kernel's
    # summation order depends on where the weights sit in memory (measured: 1.3e-6 apart).
    torch.testing.assert_close(loaded(PROMPTS), inside, rtol=1e-5, atol=1e-5)


def test_text_embedding_is_open_clip_pooling_and_projection():
    """Reference: open_clip's own TextTransformer with a head, given the same weights."""
    model = _tiny_clip().eval()
    text = model.config.text
    reference = TextTransformer(context_length=text.context_length, width=text.width, heads=text.heads,
                                layers=text.layers, output_dim=model.config.embed_dim).eval()
    reference.load_state_dict({**model.text.state_dict(), "text_projection": model.text_projection})
    tokens = model.text.tokenize(PROMPTS)
    with torch.no_grad():
        expected = F.normalize(reference(tokens), dim=-1)
        assert torch.allclose(model.encode_text(PROMPTS), expected, atol=1e-5)


def test_image_embedding_uses_open_clip_normalisation():
    model = _tiny_clip().eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    normalize = Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)  # what open_clip's transform ends with
    with torch.no_grad():
        expected = F.normalize(model.visual(normalize((images + 1) / 2)), dim=-1)
        assert torch.allclose(model.encode_image(images), expected, atol=1e-5)
        scores = clip_score(model, images, PROMPTS[:2])
        assert torch.allclose(scores, 100 * (expected * model.encode_text(PROMPTS[:2])).sum(-1), atol=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(model, images, PROMPTS)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model.encode_image(images[:, :, :32])


def test_loss_with_one_positive_per_row_is_open_clip_cliploss():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    expected = open_clip.ClipLoss()(images, texts, scale)
    assert torch.allclose(contrastive_loss(images, texts, scale), expected)
    assert torch.allclose(contrastive_loss(images, texts, scale, torch.eye(5, dtype=torch.bool)), expected)


def test_loss_spreads_the_target_over_all_positives():
    """Two images with the same caption: each row's target is half on either text (closed form)."""
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    texts = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    logits = 3.0 * images @ texts.T
    # Cross-entropy against a uniform target: logsumexp minus the mean logit, for rows and columns.
    rows = (logits.logsumexp(1) - logits.mean(1)).mean()
    columns = (logits.logsumexp(0) - logits.mean(0)).mean()
    loss = contrastive_loss(images, texts, torch.tensor(3.0), torch.ones(2, 2, dtype=torch.bool))
    assert torch.allclose(loss, (rows + columns) / 2)


def test_extra_negative_texts_only_enter_the_image_to_text_term():
    """Reference written out with explicit log-softmaxes: 2 images, their 2 captions and 1 extra negative."""
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(2, 4, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(3, 4, generator=generator), dim=-1)
    positives = torch.tensor([[True, False, False], [False, True, False]])
    logits = 5.0 * images @ texts.T
    image_to_text = -(logits[0, 0] - logits[0].logsumexp(0) + logits[1, 1] - logits[1].logsumexp(0)) / 2
    text_to_image = -(logits[0, 0] - logits[:, 0].logsumexp(0) + logits[1, 1] - logits[:, 1].logsumexp(0)) / 2
    loss = contrastive_loss(images, texts, torch.tensor(5.0), positives)
    assert torch.allclose(loss, (image_to_text + text_to_image) / 2)


def test_positives_follow_what_each_caption_says():
    captions = ["a red circle", "a large red circle", "a red circle", "a blue circle"]
    canonical = ["a small red circle in the top left on a black background",
                 "a large red circle in the center on a white background",
                 "a large red circle in the center on a white background",
                 "a small blue circle in the center on a gray background"]
    assert caption_positives(captions, canonical_captions=canonical).tolist() == [
        [True, False, True, False],  # small: "a large red circle" does not describe it
        [True, True, True, False],
        [True, True, True, False],
        [False, False, False, True],
    ]
    # Without attributes only identical captions count.
    assert caption_positives(captions).tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    extra = ["a large red circle in the center on a white background", "a red square"]
    assert caption_positives(captions, captions + extra, canonical)[:, 4:].tolist() == [
        [False, False], [True, False], [True, False], [False, False]]
    with pytest.raises(ValueError, match="not a canonical"):
        caption_positives(captions[:1], canonical_captions=["a red circle"])


def test_hard_negatives_change_exactly_one_attribute_and_avoid_held_out_pairs():
    samples = canonical_samples()
    canonical = [caption for caption, s in samples.items() if (s.color, s.shape) not in HELDOUT_PAIRS][:300]
    negatives = hard_negative_captions(canonical, torch.Generator().manual_seed(0))
    changed = set()
    for caption, negative in zip(canonical, negatives, strict=True):
        before, after = samples[caption], samples[negative]
        differences = [a for a in VOCABULARY if getattr(before, a) != getattr(after, a)]
        assert len(differences) == 1
        changed.add(differences[0])
        assert (after.color, after.shape) not in HELDOUT_PAIRS
    assert changed == set(VOCABULARY)
    assert hard_negative_captions(canonical, torch.Generator().manual_seed(0)) == negatives


def test_loss_decreases_on_a_fixed_batch():
    model = _tiny_clip()
    batch = _shapes_batch(16)
    positives = caption_positives(batch["captions"], canonical_captions=batch["canonical_captions"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = contrastive_loss(*model(batch["images"], batch["captions"]), positives)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _config(run_dir, max_steps: int) -> dict:
    return {
        "clip": TINY,
        "clip_training": {"eval_samples": 8, "eval_batch_size": 8},
        "data": {"dataset": "shapes-v1", "size": 64},
        "train": {"output_dir": str(run_dir), "max_steps": max_steps, "batch_size": 4, "learning_rate": 1e-3,
                  "warmup_steps": 2, "weight_decay": 0.1, "checkpoint_every": 2, "log_every": 1},
    }


def test_training_prints_how_many_corrupt_samples_it_skipped(tmp_path, capsys):
    good = write_shards("train", 8, tmp_path, samples_per_shard=8)
    corrupt = write_tar(tmp_path / "corrupt.tar", [(f"{key}.{ext}", data) for key in "ab"
                                                   for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a circle"))])
    config = _config(tmp_path / "run", 2)
    config["data"] = {"dataset": "webdataset", "urls": [*map(str, good), str(corrupt)], "size": 64}
    train_clip(config)
    assert "2 corrupt sample(s) or shard read(s) skipped; the warnings say why" in capsys.readouterr().out


def test_training_run_exports_and_resumes_as_if_uninterrupted(tmp_path):
    run_dir = tmp_path / "run"
    path = train_clip(_config(run_dir, 3))
    assert path == run_dir / "text_encoder.safetensors"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (run_dir / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert set(metrics["val"]) == {"num_samples", "top1", "color", "shape", "size", "position", "background"}
    assert metrics["val"]["num_samples"] == metrics["heldout"]["num_samples"] == 8
    clip = load_clip(run_dir / "clip.safetensors")
    text_encoder = load_stage(path, "text_encoder")
    assert torch.equal(text_encoder(PROMPTS), clip.text(PROMPTS))

    before = load_file(run_dir / "checkpoints" / "step-000003" / "model.safetensors")
    resumed = train_clip(_config(run_dir, 5), resume=True)
    state = json.loads((run_dir / "checkpoints" / "step-000005" / "state.json").read_text())
    assert state == {"step": 5, "samples_seen": 20}
    straight_dir = tmp_path / "straight"
    train_clip(_config(straight_dir, 5))
    after_resume, straight = load_file(run_dir / "clip.safetensors"), load_file(straight_dir / "clip.safetensors")
    assert resumed == path and after_resume.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.allclose(after_resume[key], value, atol=1e-6), key
    assert not torch.allclose(before["logit_scale"], after_resume["logit_scale"])


def test_bad_config_is_one_line_input_error(tmp_path):
    config = _config(tmp_path, 1)
    with pytest.raises(InputError, match="data.size is 32"):
        train_clip({**config, "data": {"size": 32}})
    with pytest.raises(InputError, match="unknown TextEncoderConfig parameter"):
        train_clip({**config, "clip": {"text": {"width": 32, "layers": 1, "heads": 2, "widht": 3}}})
    with pytest.raises(InputError, match="output_dim must be unset"):
        train_clip({**config, "clip": {"text": {"width": 32, "layers": 1, "heads": 2, "output_dim": 8}}})
    assert ClipConfig.from_dict({"vision": {"width": 64}}).vision == VisionConfig(width=64)
    assert TextEncoderConfig(**ClipConfig().to_dict()["text"]) == ClipConfig().text


def test_cli_reports_a_missing_config(tmp_path, capsys):
    assert run_main(train_clip_script.main, ["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config not found" in capsys.readouterr().err
