"""Run under torchrun by test_distributed.py: pretrain, then save this rank's final parameters.

A third argument, ``skewed-time-limit``, gives rank 1 a time limit that has passed before its first step
ends and rank 0 an hour: as if the ranks' clocks (or their start-up times) differed. ``sigterm-at-step-2``
delivers a SIGTERM to rank 1 alone during step 2 (its flag set as the signal handler would).
``own-process-group`` starts the process group before pretrain, as a caller's own program would, and
uses it afterwards. Each rank records whether a process group is left after pretrain.
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
    config = PretrainConfig(dataset="folder", data_root=data_root, image_size=16, num_views=3, batch_size=8,
                            epochs=2, seed=5, device="cpu", progress=False, tensorboard=False, output_dir=output_dir,
                            time_limit=time_limit)
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
