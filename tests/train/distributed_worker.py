"""Started by torchrun in tests/train/test_distributed_training.py, once per process.

Trains one stage through the library (`train_vae` / `train_refiner`) with the config in a JSON
file, then writes this process's weights to OUT/rank<R>.safetensors, so that the test can
compare the processes with each other and with a single-process run.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/distributed_worker.py \\
        vae|refiner RUN CONFIG.json OUT [--resume]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusevae.config import config_from_json
from diffusevae.distributed import processes
from diffusevae.train.stages import train_refiner, train_vae

torch.set_num_threads(1)
stage, run, config_path, out = sys.argv[1:5]
cfg = config_from_json(json.loads(Path(config_path).read_text()))
train = train_vae if stage == "vae" else train_refiner
model = train(cfg, run, resume="--resume" in sys.argv, progress=False)
weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
save_file(weights, str(Path(out) / f"rank{processes(cfg.train_vae.device).rank}.safetensors"))
