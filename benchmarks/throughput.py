"""Training-step throughput: relreason's step against a reference-style step and the backbone alone.

For each backbone and K it times, in this one process and on the same device:

* ``reference``: the reference notebook's way: per-image PIL views from a DataLoader, Python-loop pairing
  (``torch.roll`` per block pair), the relation head on materialised pair vectors, fp32;
* ``relreason``: the trainer's step: views made in a batch on the device from a uint8 tensor, vectorised
  pairing, factorised head, metrics kept on the device, in the chosen numeric mode;
* ``backbone``: forward + backward of the backbone alone on views that are already made (the ceiling),
  in the same numeric mode.

    python benchmarks/throughput.py                       # CPU or CUDA, whichever is there
    python benchmarks/throughput.py --modes fp32 bf16+cl  # several numeric modes side by side
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import traceback
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from relreason import RelationalReasoning
from relreason.backbones import build_backbone
from relreason.data import ArrayImageDataset, MultiViewDataset, load_dataset, relational_augmentation
from relreason.data.batch_augment import BatchRelationalAugmentation
from relreason.data.batch_views import BatchViewLoader, DeviceMultiViewDataset
from relreason.data.sampler import EpochBatchSampler
from relreason.errors import RelreasonError
from relreason.head import RelationHead

MEAN, STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)  # Fashion-MNIST's


def load_images(name: str, data_root: str, limit: int) -> ArrayImageDataset:
    if name != "synthetic":
        try:
            dataset = load_dataset(name, data_root, "train")
            if isinstance(dataset, ArrayImageDataset):
                return ArrayImageDataset(dataset.images[:limit], dataset.labels[:limit])
        except RelreasonError as error:
            print(f"# {error}; using synthetic 28x28 images")
    rng = np.random.default_rng(0)
    return ArrayImageDataset(rng.integers(0, 256, (limit, 28, 28), dtype=np.uint8), np.zeros(limit, dtype=np.int64))


def cpu_name() -> str:
    """The processor's model name where the OS tells it (Linux), with its core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, mode: str):
    if "bf16" in mode:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if "fp16" in mode:
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def prepare(module: nn.Module, mode: str, device: torch.device) -> nn.Module:
    module = module.to(device)
    if "cl" in mode.split("+"):
        module = module.to(memory_format=torch.channels_last)
    if "compile" in mode.split("+"):
        module.compile(dynamic=False)  # as the trainer's --compile
    return module


@contextmanager
def no_host_sync(device: torch.device):
    """On CUDA, make any operation that waits for the GPU an error: a step must queue its work and go on."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def timed(steps_by_name: dict, steps: int, warmup: int, device: torch.device, block: int = 2) -> dict:
    """Median seconds per step of each step function, timed in interleaved blocks of ``block`` steps.

    Interleaving spreads any drift in the machine's load (other processes, clock changes) over every row
    alike, so the ratios between rows hold better than with one row timed after another.
    """
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    per_block = {name: [] for name in steps_by_name}
    for _ in range(max(1, math.ceil(steps / block))):
        for name, step in steps_by_name.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            synchronize(device)
            per_block[name].append((time.perf_counter() - start) / block)
    return {name: float(np.median(times)) for name, times in per_block.items()}


# --- the reference-style step, kept for comparison --------------------------------------------------------------

def reference_pairs(features: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = features.shape[0] // num_views
    pairs, targets, shift = [], [], 1
    for start_1 in range(0, size * num_views, size):
        for start_2 in range(start_1 + size, size * num_views, size):
            a, b = features[start_1:start_1 + size], features[start_2:start_2 + size]
            pairs += [torch.cat([a, b], 1), torch.cat([a, torch.roll(b, shifts=shift, dims=0)], 1)]
            targets += [torch.ones(size, device=features.device), torch.zeros(size, device=features.device)]
            shift = shift + 1 if shift + 1 < size else 1
    return torch.cat(pairs), torch.cat(targets)


def reference_step_factory(backbone_name, images, num_views, batch_size, workers, device):
    backbone = build_backbone(backbone_name, image_size=32).to(device)
    head = RelationHead(2 * backbone.feature_dim).to(device)
    optimizer = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-3)
    views = MultiViewDataset(images, relational_augmentation(32, MEAN, STD), num_views)
    loader = DataLoader(views, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            data, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            data, _ = next(batches)
        features = backbone(torch.cat([v.to(device, non_blocking=True) for v in data], 0))
        pairs, targets = reference_pairs(features, num_views)
        scores = head(pairs).squeeze()
        loss = nn.functional.binary_cross_entropy_with_logits(scores, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # The notebook reads the accuracy every step, which waits for the device.
        ((scores > 0).float() == targets).float().mean().item()

    return step


# --- relreason's step ---------------------------------------------------------------------------------------------

def relreason_step_factory(backbone_name, images, num_views, batch_size, mode, device):
    compiled = "compile" in mode.split("+")  # as the trainer's --compile: the backbone and the colour jitter
    model = RelationalReasoning(prepare(build_backbone(backbone_name, image_size=32), mode, device), image_size=32)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")  # as the trainer's
    augmentation = BatchRelationalAugmentation(32, MEAN, STD, compile=compiled)
    dataset = DeviceMultiViewDataset(images, augmentation, num_views, 0, device)
    epoch = 0

    def batches():
        nonlocal epoch
        while True:
            dataset.set_epoch(epoch)
            yield from BatchViewLoader(dataset, EpochBatchSampler(len(dataset), batch_size, 0, epoch))
            epoch += 1

    source = batches()
    totals = torch.zeros(2, device=device, dtype=torch.float64)

    def next_views():
        nonlocal source
        try:
            return next(source)
        except StopIteration:  # a sync error raised while making views ended the generator: the unchecked rerun
            source = batches()
            return next(source)

    def step(check_sync: bool = True):
        with no_host_sync(device) if check_sync else nullcontext():
            views, _ = next_views()
            with autocast(device, mode):
                out = model(views)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            totals.add_(torch.stack([out.loss.detach(), out.accuracy]).double())  # on the device: no sync

    # Unchecked: the first step copies what is made once per device (pair indices, interpolation tables,
    # constants) and compiles; the check is for the steps after it, which must never wait for the GPU.
    step(check_sync=False)
    return step


def backbone_step_factory(backbone_name, num_views, batch_size, mode, device):
    backbone = prepare(build_backbone(backbone_name, image_size=32), mode, device)
    views = torch.randn(num_views * batch_size, 3, 32, 32, device=device)

    def step():
        with autocast(device, mode):
            features = backbone(views)
        features.float().square().mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the steps run [cuda when there is one, else cpu]")
    parser.add_argument("--backbones", nargs="+", default=["conv4", "resnet32"], help="[conv4 resnet32]")
    parser.add_argument("--views", nargs="+", type=int, default=[4, 16, 32], help="values of K [4 16 32]")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step [64]")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="numeric modes of relreason's step and the backbone: fp32, bf16, fp16, each optionally "
                        "+cl (channels_last) and +compile (as --compile: the backbone and the colour jitter) [fp32 and bf16+cl]")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per row: relreason's and the backbone's rows alternate in blocks of 2 and report "
                        "their median block; the reference runs its steps in one block of its own [10]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row's timed ones [3]")
    parser.add_argument("--reference-workers", type=int, default=None,
                        help="DataLoader workers of the reference step [0 on CPU, min(16, cores) on CUDA]")
    parser.add_argument("--skip-reference", action="store_true", help="time relreason's step and the backbone alone")
    parser.add_argument("--dataset", default="fashion-mnist", help="images to augment, or 'synthetic' [fashion-mnist]")
    parser.add_argument("--data-root", default="data", help="where the dataset's files are [data]")
    parser.add_argument("--rgb", action="store_true",
                        help="give the images as three channels, so every colour operation runs (grey images skip "
                        "saturation, hue and greyscale, which leave them unchanged)")
    args = parser.parse_args()

    device = torch.device(args.device)
    modes = args.modes or ["fp32", "bf16+cl"]
    workers = args.reference_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(16, os.cpu_count() or 1)
    images = load_images(args.dataset, args.data_root, 60000)
    if args.rgb and images.images.ndim == 3:
        images = ArrayImageDataset(np.repeat(images.images[..., None], 3, axis=3), images.labels)
    colours = "RGB" if images.images.ndim == 4 and images.images.shape[3] == 3 else "grey"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# device {device} ({where}), {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
          f"{colours} images, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} (relreason and backbone rows interleaved, medians)"
          + ("" if args.skip_reference else f"; reference with {workers} workers"))
    if device.type == "cuda":
        print(f"# CUDA fp32 rows: cuDNN convolutions in TF32 {torch.backends.cudnn.allow_tf32} (PyTorch's default: True), "
              f"matmuls in TF32 {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    header = "| backbone | K | step | mode | ms/step | views/s | x reference | / backbone-only |"
    print(header)
    print("|---|---|---|---|---:|---:|---:|---:|")
    failed = False
    for backbone_name in args.backbones:
        for num_views in args.views:
            try:
                failed |= not time_rows(backbone_name, num_views, images, modes, workers, device, args)
            except Exception as error:  # one failed row must not cost the rest of the table (one GPU call)
                message = str(error).strip().splitlines()[0].replace("|", "/") if str(error).strip() else ""
                print(f"| {backbone_name} | {num_views} | FAILED | | {type(error).__name__}: {message} | | | |",
                      flush=True)
                failed = True
    if failed:
        raise SystemExit(1)


def time_reference(backbone_name, num_views, images, workers, device, args) -> float | None:
    """Seconds per reference step, printed as its row; None (and a note) when it cannot run.

    Many DataLoader workers can die where shared memory is small (K=32 batches are ~25 MB each): then once
    more with at most 4, so the other rows still get their ratios."""
    views_per_step = num_views * args.batch_size
    for count in dict.fromkeys([workers, min(workers, 4), 0]):  # 0: no shared memory at all
        step = None
        try:
            # On its own, in one block: its DataLoader workers would otherwise fill their queue while the
            # other rows run, and the reference would be timed on batches prepared for free.
            step = reference_step_factory(backbone_name, images, num_views, args.batch_size, count, device)
            # Warm-up past the batches the workers queue up at the start (prefetch_factor 2 each), so that the
            # timed steps wait for batches made at the workers' steady pace.
            warmup = max(args.warmup, 2 * count)
            seconds = timed({"reference": step}, args.steps, warmup, device, block=args.steps)["reference"]
        except Exception as error:  # noqa: BLE001 - reported, and the rows of relreason still run
            print(f"# reference {backbone_name} K={num_views} with {count} DataLoader workers failed: "
                  f"{type(error).__name__}: {str(error).strip()[:200]}", flush=True)
            continue
        finally:
            del step  # ends its DataLoader workers before the other rows are timed
        label = "reference" if count == workers else f"reference, {count} workers"
        print(f"| {backbone_name} | {num_views} | {label} | fp32 | {1000 * seconds:.0f} | "
              f"{views_per_step / seconds:,.0f} | 1.00 | |", flush=True)
        return seconds
    return None


def time_rows(backbone_name, num_views, images, modes, workers, device, args) -> bool:
    """Time and print one backbone and K; False when relreason's step waited for the GPU (rows still printed)."""
    synced = False
    views_per_step = num_views * args.batch_size
    reference = None
    if not args.skip_reference:
        reference = time_reference(backbone_name, num_views, images, workers, device, args)
    steps = {}
    for mode in modes:
        steps[("relreason", mode)] = relreason_step_factory(backbone_name, images, num_views, args.batch_size, mode, device)
        steps[("backbone", mode)] = backbone_step_factory(backbone_name, num_views, args.batch_size, mode, device)
    try:
        seconds = timed(steps, args.steps, args.warmup, device)
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        # Say so (and exit non-zero at the end), then time the same steps unchecked: the figures still count.
        synced = True
        frames = [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                  for frame in traceback.extract_tb(error.__traceback__)
                  if "relreason" in frame.filename or "benchmarks" in frame.filename][-4:]
        print(f"# SYNC: relreason's {backbone_name} K={num_views} step waited for the device in one of the modes "
              f"{', '.join(modes)} ({str(error).splitlines()[0]}; at {' <- '.join(reversed(frames))}); the rows "
              "below are timed without the check", flush=True)
        unchecked = {name: partial(step, check_sync=False) if name[0] == "relreason" else step
                     for name, step in steps.items()}
        seconds = timed(unchecked, args.steps, args.warmup, device)
    for mode in modes:
        ours, ceiling = seconds[("relreason", mode)], seconds[("backbone", mode)]
        speedup = f"{reference / ours:.2f}" if reference else ""
        print(f"| {backbone_name} | {num_views} | relreason | {mode} | {1000 * ours:.0f} | "
              f"{views_per_step / ours:,.0f} | {speedup} | {ours / ceiling:.2f} |", flush=True)
        ratio = f"{reference / ceiling:.2f}" if reference else ""
        print(f"| {backbone_name} | {num_views} | backbone only | {mode} | {1000 * ceiling:.0f} | "
              f"{views_per_step / ceiling:,.0f} | {ratio} | 1.00 |", flush=True)
    return not synced


if __name__ == "__main__":
    main()
