"""One rank of the two-process diffusion run of tests/test_distributed.py, started by torchrun:

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py CONFIG.json RECORD_DIR

Runs `train_diffusion` on the config (a JSON file) and writes to RECORD_DIR what the trainer keeps to
itself, per rank R: `rank-R.json` (world size, backend, the shapes-v1 sample indices this rank
trained on, in order) and `rank-R.safetensors` (its U-Net weights before and after training, under
the prefixes `initial.` and `final.`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import save_file

from ldm.training import diffusion


def main(config_path: str, record_dir: str) -> None:
    indices: list[int] = []
    group: dict[str, Any] = {"world_size": 1, "backend": None}
    unets: list[diffusion.UNetModel] = []
    initial: dict[str, Any] = {}
    make_loader, unet_model = diffusion.make_loader, diffusion.UNetModel

    def recording_loader(*args: Any, **kwargs: Any) -> Iterator[dict]:
        # Read here, while training: the trainer's end_training destroys the process group.
        if dist.is_available() and dist.is_initialized():
            group.update(world_size=dist.get_world_size(), backend=dist.get_backend())
        # The trainer takes batches from this iterator one at a time, so every recorded index was trained on.
        for batch in make_loader(*args, **kwargs):
            indices.extend(batch["indices"].tolist())
            yield batch

    def recording_unet(config: diffusion.UNetConfig) -> diffusion.UNetModel:
        # The first U-Net built is the one trained; later ones are export copies on rank 0.
        unet = unet_model(config)
        if not unets:
            initial.update({f"initial.{k}": v.detach().clone().contiguous() for k, v in unet.state_dict().items()})
        unets.append(unet)
        return unet

    diffusion.make_loader = recording_loader
    diffusion.UNetModel = recording_unet
    diffusion.train_diffusion(json.loads(Path(config_path).read_text()))

    rank = int(os.environ["RANK"])
    out = Path(record_dir)
    (out / f"rank-{rank}.json").write_text(json.dumps({**group, "indices": indices}))
    final = {f"final.{k}": v.detach().contiguous() for k, v in unets[0].state_dict().items()}
    save_file({**initial, **final}, str(out / f"rank-{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
