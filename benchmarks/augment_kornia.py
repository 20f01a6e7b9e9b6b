"""Batched augmentation: relreason's own code against kornia's, on the same uint8 batch (kornia optional).

    pip install kornia && python benchmarks/augment_kornia.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from relreason.data.batch_augment import BatchRelationalAugmentation

MEAN, STD = (0.286,) * 3, (0.353,) * 3


def seconds_per_call(function, repeats: int, device: torch.device) -> float:
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--views", nargs="+", type=int, default=[4, 16, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import kornia.augmentation as K

    device = torch.device(args.device)
    ours = BatchRelationalAugmentation(32, MEAN, STD)
    theirs = torch.nn.Sequential(
        K.RandomResizedCrop((32, 32), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ).to(device)
    images = torch.randint(0, 256, (args.batch_size, 3, 28, 28), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    print(f"# {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, 28x28 -> 32x32")
    print("| K | relreason ms | kornia ms | kornia / relreason |\n|---:|---:|---:|---:|")
    for num_views in args.views:
        a = seconds_per_call(lambda: ours(images, num_views, generator), args.repeats, device)
        b = seconds_per_call(lambda: theirs(images.repeat(num_views, 1, 1, 1).float() / 255), args.repeats, device)
        print(f"| {num_views} | {1000 * a:.1f} | {1000 * b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
