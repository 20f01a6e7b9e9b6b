"""Run under torchrun by test_distributed.py: pretrain, then save this rank's final parameters.

A third argument, ``skewed-time-limit``, gives rank 1 a time limit that has passed before its first step
ends and rank 0 an hour: as if the ranks' clocks (or their start-up times) differed.
"""

import os
import sys

import torch

from relreason.train import PretrainConfig, pretrain

if __name__ == "__main__":
    data_root, output_dir = sys.argv[1], sys.argv[2]
    time_limit = None
    if sys.argv[3:] == ["skewed-time-limit"]:
        time_limit = 1e-9 if os.environ["RANK"] == "1" else 60.0
    config = PretrainConfig(dataset="folder", data_root=data_root, image_size=16, num_views=3, batch_size=8,
                            epochs=2, seed=5, device="cpu", progress=False, tensorboard=False, output_dir=output_dir,
                            time_limit=time_limit)
    result = pretrain(config)
    # Parameters only: BatchNorm running statistics are per rank (DDP re-broadcasts rank 0's at each forward).
    parameters = {name: p.detach() for name, p in result.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{os.environ['RANK']}.pt"))
