"""Run under torchrun by test_distributed.py: pretrain, then save this rank's final parameters.

A third argument, ``skewed-time-limit``, gives rank 1 a time limit that has passed before its first step
ends and rank 0 an hour: as if the ranks' clocks (or their start-up times) differed. ``sigterm-at-step-2``
delivers a SIGTERM to rank 1 alone during step 2 (its flag set as the signal handler would).
``own-process-group`` starts the process group before pretrain, as a caller's own program would, and
uses it afterwards. ``log-every-step`` logs running means and checkpoints at every step. ``nan-on-rank-1``
makes rank 1's features NaN from its second step on (logging every step). ``download`` pretrains on MNIST
with --download, its fetch replaced by one that logs the rank and writes 42 small images. Each rank
records whether a process group is left after pretrain.
"""

import os
import sys

import torch
import torch.distributed as dist

from relreason.train import PretrainConfig, StopRequest, pretrain

if __name__ == "__main__":
    data_root, output_dir = sys.argv[1], sys.argv[2]
    time_limit = None
    if sys.argv[3:] == ["skewed-time-limit"]:
        time_limit = 1e-9 if os.environ["RANK"] == "1" else 60.0
    if sys.argv[3:] == ["sigterm-at-step-2"] and os.environ["RANK"] == "1":
        vote = StopRequest.agreed
        votes = []

        def agreed_with_sigterm_at_step_2(self, *args, **kwargs):
            votes.append(1)
            self.requested = self.requested or len(votes) == 2
            return vote(self, *args, **kwargs)

        StopRequest.agreed = agreed_with_sigterm_at_step_2
    if sys.argv[3:] == ["own-process-group"]:
        dist.init_process_group("gloo")
    every_step = {"log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 100} \
        if sys.argv[3:] == ["log-every-step"] else {}
    if sys.argv[3:] == ["nan-on-rank-1"]:
        from relreason.backbones import register_backbone
        from relreason.backbones.conv4 import Conv4

        @register_backbone("nan-on-rank-1")
        class NanOnRank1(Conv4):
            calls = 0

            def forward(self, x):
                NanOnRank1.calls += torch.is_grad_enabled()  # training steps, not the pre-flight shape check
                features = super().forward(x)
                return features * float("nan") if os.environ["RANK"] == "1" and NanOnRank1.calls > 1 else features

        every_step = {"backbone": "nan-on-rank-1", "log_every": 1}
    dataset = "folder"
    if sys.argv[3:] == ["download"]:
        import time
        from pathlib import Path

        import numpy as np

        from relreason.data import standard_datasets

        def fetch(key, root, split):
            with open(Path(root).parent / "fetched-by.txt", "a") as log:  # the output folder is made later
                log.write(f"rank{os.environ['RANK']}\n")
            time.sleep(1.0)  # long enough for another rank fetching at once to be seen doing so
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            images = np.random.default_rng(0).integers(0, 256, (42, 28, 28), dtype=np.uint8)
            for prefix, count in (("train", 42), ("t10k", 2)):
                for kind, array in (("images-idx3", images[:count]), ("labels-idx1", np.arange(count) % 10)):
                    array = np.asarray(array, dtype=np.uint8)
                    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
                    (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())

        standard_datasets._download = fetch
        dataset, every_step = "mnist", {"download": True}
    config = PretrainConfig(dataset=dataset, data_root=data_root, image_size=16, num_views=3, batch_size=8,
                            epochs=2, seed=5, device="cpu", progress=False, tensorboard=False, output_dir=output_dir,
                            time_limit=time_limit, **every_step)
    result = pretrain(config)
    # Parameters only: BatchNorm running statistics are per rank (DDP re-broadcasts rank 0's at each forward).
    parameters = {name: p.detach() for name, p in result.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{os.environ['RANK']}.pt"))
    left = dist.is_initialized()
    if left:  # the caller's group still works
        total = torch.ones(1)
        dist.all_reduce(total)
        left = int(total.item())
        dist.destroy_process_group()
    with open(os.path.join(output_dir, f"rank{os.environ['RANK']}-process-group.txt"), "w") as file:
        file.write(str(left))
