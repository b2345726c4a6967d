"""Reading .safetensors files: tensors mapped from the file and read when used, each mapping gone with its
tensor, so converting a model while loading it never holds the file and the converted weights whole."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.weights_io import read_checkpoint
from tests.conftest import randomize_, tiny_spec

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


def mappings_of(path) -> int:
    """How many of this process's memory mappings are of `path`."""
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(str(path)) for line in maps)


def write_unaligned(path) -> None:
    """A valid file whose float32 tensor starts 3 bytes into the data, after a uint8 one (safetensors'
    own writer aligns tensors; other writers need not)."""
    header = {"a_bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b_floats": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]},
              "c_empty": {"dtype": "F16", "shape": [0, 4], "data_offsets": [19, 19]},
              "__metadata__": {"note": "unaligned"}}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]) + struct.pack("<4f", 1.5, -2.0, 3.25, 4.0))


def test_read_tensors_equal_the_files_in_every_dtype(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"w_{dtype}".replace("torch.", ""): (torch.randn(5, 7, generator=generator) * 100).to(dtype)
               for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["mask"] = torch.tensor([True, False, True])
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    read, metadata = read_checkpoint(path)
    assert metadata == {"k": "v"}
    reference = load_file(str(path))
    assert read.keys() == reference.keys()
    for key, value in reference.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key

    write_unaligned(tmp_path / "unaligned.safetensors")
    read, metadata = read_checkpoint(tmp_path / "unaligned.safetensors")
    assert metadata == {"note": "unaligned"}
    assert torch.equal(read["a_bytes"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(read["b_floats"], torch.tensor([[1.5, -2.0], [3.25, 4.0]]))
    assert read["c_empty"].shape == (0, 4) and read["c_empty"].dtype == torch.float16


@linux_only
def test_each_mapping_goes_with_its_tensor_and_writes_stay_in_memory(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}, str(path))
    tensors, _ = read_checkpoint(path)
    assert mappings_of(path) == 4
    tensors["w1"].add_(10.0)  # copy-on-write: this process's page changes, the file does not
    assert torch.equal(tensors["w1"], torch.full((64, 64), 11.0))
    assert torch.equal(load_file(str(path))["w1"], torch.full((64, 64), 1.0))
    del tensors["w0"]
    assert mappings_of(path) == 3
    del tensors
    assert mappings_of(path) == 0


def test_truncated_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(256, 256)}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_checkpoint(path)


PEAK_PROBE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from ldm.weights_io import load_strict, read_checkpoint

    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    with torch.device("meta"):
        module = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(16)))
    Path("/proc/self/clear_refs").write_text("5")
    before = hwm()
    load_strict(module, read_checkpoint(sys.argv[1])[0], "test", sys.argv[1], dtype=torch.bfloat16)
    print(hwm() - before)
""")


@linux_only
def test_converting_while_loading_never_holds_the_file_beside_the_model(tmp_path):
    """64 MiB of float32 weights loaded as bfloat16: the peak rise is the 32 MiB model and about one weight
    from the file, where reading the whole file first rises by 96 MiB."""
    with torch.device("meta"):
        shapes = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(16))).state_dict()
    path = tmp_path / "linear.safetensors"
    save_file({k: torch.randn(v.shape) for k, v in shapes.items()}, str(path))
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True,
                            check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    rise_mib = int(result.stdout.strip().splitlines()[-1]) / 2**20
    assert 30 < rise_mib < 48, rise_mib


@linux_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_pipeline_keeps_no_mapping_of_its_file(tmp_path, dtype):
    """Converted or not, the weights are the pipeline's own: a file overwritten in place later cannot
    change them (or kill the process, as a mapping of a cut file would)."""
    pipe = Pipeline.from_spec(tiny_spec())
    for module in (pipe.unet, pipe.text_encoder, pipe.autoencoder):
        randomize_(module)
    path = pipe.save(tmp_path / "tiny.safetensors")
    loaded = Pipeline.from_checkpoint(path, dtype=dtype)
    assert mappings_of(path) == 0 and loaded.dtype == dtype
    path.write_bytes(b"")
    assert all(torch.equal(ours, theirs.to(dtype)) for ours, theirs in
               zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values(), strict=True))
