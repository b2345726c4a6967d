"""The benchmark's peer engines make the image they are compared on (slow: OpenVINO converts three models;
the peers need the `bench` extra and fail, not skip, without it)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import benchmark  # noqa: E402


@pytest.mark.slow
def test_openvino_engine_makes_diffusers_image(tmp_path):
    args = benchmark.parse_args(["--model", "tiny", "--latent-size", "8", "--steps", "3", "--batch", "2",
                                 "--engines", "diffusers,openvino"])
    runs = benchmark.engine_runs(args, torch.device("cpu"), torch.float32, {"diffusers", "openvino"}, tmp_path)
    ours, reference = runs["openvino"](), runs["diffusers"]()
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert reference.std() > 0.01  # an image, not a constant
    assert (ours - reference).abs().max() < 1e-4
    assert torch.equal(runs["openvino"](), ours)  # the same image on every call: the scheduler starts over


def test_a_missing_peer_is_one_line_naming_the_extra(monkeypatch):
    import peer_engines

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(benchmark.InputError, match=r"pip install -e '\.\[bench\]'"):
        peer_engines._import("openvino", "openvino")
