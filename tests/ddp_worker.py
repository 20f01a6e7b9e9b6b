"""Run under torchrun by test_distributed.py: pretrain, then save this rank's final parameters."""

import os
import sys

import torch

from relreason.train import PretrainConfig, pretrain

if __name__ == "__main__":
    data_root, output_dir = sys.argv[1], sys.argv[2]
    config = PretrainConfig(dataset="folder", data_root=data_root, image_size=16, num_views=3, batch_size=8,
                            epochs=2, seed=5, device="cpu", progress=False, tensorboard=False, output_dir=output_dir)
    result = pretrain(config)
    # Parameters only: BatchNorm running statistics are per rank (DDP re-broadcasts rank 0's at each forward).
    parameters = {name: p.detach() for name, p in result.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{os.environ['RANK']}.pt"))
