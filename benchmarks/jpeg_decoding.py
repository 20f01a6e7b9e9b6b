"""How much reading a folder of camera-sized JPEGs costs with reduced decoding (PIL's draft) and without.

    python benchmarks/jpeg_decoding.py [--count 24] [--width 4000] [--height 2670]

Writes ``--count`` JPEGs made from scikit-learn's two bundled photographs (scaled up to the size asked) into a
temporary folder, then times, on one thread, what each use does with an image: the centre square at the training
size (``--augment tensor``'s decoding, and evaluation) and K=4 views of the paper's augmentation (the per-image
path), at 32 and 96 px, with the folder's JPEGs decoded whole and as relreason decodes them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images

from relreason.data import ImageFolderDataset, relational_augmentation
from relreason.data.image_folder import decoded_for
from relreason.data.transforms import smallest_crop_side, square_crop


def write_photos(root: Path, count: int, width: int, height: int) -> None:
    photos = [Image.fromarray(a).resize((width, height), Image.BICUBIC) for a in load_sample_images().images]
    for i in range(count):
        photos[i % len(photos)].rotate(3 * i).save(root / f"{i:03d}.jpg", quality=90)


def images_per_second(folder, use) -> float:
    start = time.perf_counter()
    for i in range(len(folder)):
        use(folder[i][0])
    return len(folder) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=2670)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp), options.count, options.width, options.height)
        folder = ImageFolderDataset(tmp)
        print(f"{len(folder)} JPEGs of {options.width}x{options.height}, one thread, images/s")
        print("| use | size | whole | reduced | ratio | decoded at |")
        print("|---|---:|---:|---:|---:|---|")
        for size in (32, 96):
            views = relational_augmentation(size, [0.5] * 3, [0.25] * 3)
            uses = {
                "centre square (--augment tensor, evaluate)": (square_crop(size), decoded_for(folder, size)),
                "K=4 views (per-image path)": (lambda image, views=views: [views(image) for _ in range(4)],
                                               decoded_for(folder, size, smallest_crop_side(0.08))),
            }
            for name, (use, reduced) in uses.items():
                whole = images_per_second(folder, use)
                fast = images_per_second(reduced, use)
                shape = "x".join(map(str, reduced[0][0].size))
                print(f"| {name} | {size} | {whole:.1f} | {fast:.1f} | {fast / whole:.1f}x | {shape} |")


if __name__ == "__main__":
    main()
