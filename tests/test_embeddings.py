"""Textual-inversion embeddings: the formats AUTOMATIC1111 and diffusers write, trigger words, bad files."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.cli import run_main
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    randomize_(pipe.text_encoder, seed=2, std=0.1)
    return pipe


def _rows(pipe: Pipeline, text: str) -> torch.Tensor:
    """The token-embedding rows of `text`: an embedding that stands for exactly those words."""
    return pipe.text_encoder.token_embedding.weight[pipe.text_encoder.tokenizer.encode(text)].detach().clone()


def test_trigger_word_is_its_vectors_and_nothing_else(tmp_path):
    pipe = _pipeline()
    vectors = _rows(pipe, "red circle")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 100},
               tmp_path / "redthing.pt")
    pipe.load_embeddings(tmp_path)
    encoder = pipe.text_encoder
    ids = encoder.encode_text("a redthing on white, redthings")
    vocab = encoder.config.vocab_size
    assert ids == [*encoder.tokenizer.encode("a"), vocab, vocab + 1, *encoder.tokenizer.encode("on white, redthings")]
    with torch.no_grad():
        assert torch.equal(encoder(["a redthing on white"]), encoder(["a red circle on white"]))
        weighted = pipe.encode_context(["a (redthing:1.3) on white"], [""], 7.5)[0][0]
        assert torch.equal(weighted, pipe.encode_context(["a (red circle:1.3) on white"], [""], 7.5)[0][0])
    assert "token_embedding.extra" not in encoder.state_dict()  # saving writes the checkpoint's weights only


def test_every_format_gives_the_same_vectors(tmp_path):
    pipe = _pipeline()
    vectors = _rows(pipe, "blue square")
    torch.save({"string_to_param": {"*": vectors}}, tmp_path / "a.pt")
    save_file({"emb_params": vectors}, str(tmp_path / "b.safetensors"))
    torch.save({"<b-square>": vectors[0]}, tmp_path / "c.bin")  # diffusers: one vector
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "sdxl.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}}, tmp_path / "sd1.pt")
    with pytest.warns(UserWarning, match=r"skipped 2 embeddings made for another model \(first: sd1\)"):
        pipe.load_embeddings(tmp_path)
    assert sorted(pipe.embedding_files) == ["a", "b", "c"]
    extra = pipe.text_encoder.token_embedding.extra
    assert torch.equal(extra, torch.cat([vectors, vectors, vectors[:1]]))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content, message", [
    (lambda marker: _torch_bytes({"string_to_param": {"*": _RunsCode(marker)}}), "nothing in it was run"),
    (lambda marker: b"PK\x03\x04 truncated", "cannot read the embedding"),
    (lambda marker: _torch_bytes({"name": "no vectors here"}), "holds no embedding"),
])
def test_bad_embedding_files_fail_in_one_line(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content(tmp_path / "ran"))
    with pytest.raises(InputError, match=message):
        _pipeline().load_embeddings(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_txt2img_records_embeddings_and_replay_needs_them(tmp_path, capsys):
    pipe = _pipeline()
    ckpt = pipe.save(tmp_path / "tiny.safetensors")
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": _rows(pipe, "green triangle")}, str(tmp_path / "emb" / "gtri.safetensors"))
    argv = ["--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), "--steps", "1", "--skip_grid"]
    assert run_main(txt2img.main, [*argv, "--prompt", "a gtri", "--embeddings_dir", str(tmp_path / "emb")]) == 0
    png = capsys.readouterr().out.split()[0]
    from PIL import Image

    with Image.open(png) as image:
        assert image.text["embeddings"].startswith("gtri: ")
    assert run_main(txt2img.main, [*argv, "--replay", png]) == 1
    assert "was made with the embedding gtri; pass the folder" in capsys.readouterr().err
