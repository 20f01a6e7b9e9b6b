"""relreason.data.transforms and relreason.data.multiview."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from relreason.data import (
    ArrayImageDataset,
    MultiViewDataset,
    ToRGB,
    dataset_info,
    eval_transform,
    relational_augmentation,
)
from relreason.errors import RelreasonError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _pil(size=(40, 30), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def test_relational_augmentation_recipe_and_order():
    tf = relational_augmentation(32, MEAN, STD)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [
        ToRGB,
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.RandomApply,
        T.RandomGrayscale,
        T.ToTensor,
        T.Normalize,
    ]
    _, crop, flip, jitter, grey, _, norm = tf.transforms
    assert crop.size == (32, 32) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BILINEAR
    assert flip.p == 0.5
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    cj = jitter.transforms[0]
    assert cj.brightness == pytest.approx((0.2, 1.8)) and cj.contrast == pytest.approx((0.2, 1.8))
    assert cj.saturation == pytest.approx((0.2, 1.8)) and cj.hue == pytest.approx((-0.2, 0.2))
    assert grey.p == 0.2
    assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD


def test_relational_augmentation_output():
    torch.manual_seed(0)
    tf = relational_augmentation(24, MEAN, STD)
    out = tf(_pil((50, 37)))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    outs = [tf(_pil()) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random


def test_eval_transform_deterministic_and_normalised():
    tf = eval_transform(16, MEAN, STD)
    img = _pil((40, 30))
    a, b = tf(img), tf(img)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # a flat image maps to (value - mean) / std exactly
    flat = Image.new("RGB", (20, 20), (255, 0, 128))
    out = eval_transform(8, MEAN, STD)(flat)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 4, 4], expected, atol=1e-5)
    # upsampling small images (digits 8x8 -> 32) works too
    info = dataset_info("digits")
    assert eval_transform(info.image_size, info.mean, info.std)(Image.new("RGB", (8, 8))).shape == (3, 32, 32)


def test_transform_argument_errors():
    with pytest.raises(RelreasonError, match="compute_normalization"):
        relational_augmentation(32, None, None)
    with pytest.raises(RelreasonError, match="3 values"):
        eval_transform(32, (0.5,), (0.2,))
    with pytest.raises(RelreasonError, match="positive"):
        eval_transform(32, MEAN, (0.2, 0.0, 0.3))
    with pytest.raises(RelreasonError, match="image size"):
        relational_augmentation(0, MEAN, STD)


def test_multiview_views_differ_and_shapes():
    torch.manual_seed(0)
    base = ArrayImageDataset(_images(), np.arange(6))
    mv = MultiViewDataset(base, relational_augmentation(32, MEAN, STD), num_views=4)
    assert len(mv) == 6
    views, label = mv[2]
    assert isinstance(views, list) and len(views) == 4 and label == 2
    for v in views:
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert all(not torch.equal(views[i], views[j]) for i, j in pairs)


def test_seeded_views_change_with_the_epoch_and_come_back_with_it():
    base = ArrayImageDataset(_images(), np.arange(6))
    mv = MultiViewDataset(base, relational_augmentation(32, MEAN, STD), num_views=2, seed=11)
    first = mv[3][0]
    mv.set_epoch(1)
    assert not torch.equal(mv[3][0][0], first[0])
    mv.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(mv[3][0], first))


def test_multiview_transform_called_independently_per_view():
    calls = []

    def tf(image):
        calls.append(image)
        return torch.full((1,), float(len(calls)))

    mv = MultiViewDataset(ArrayImageDataset(_images(2)), tf, num_views=3)
    views, label = mv[1]
    assert label == -1
    assert [v.item() for v in views] == [1.0, 2.0, 3.0]
    assert len(calls) == 3 and all(isinstance(c, Image.Image) and c.mode == "RGB" for c in calls)


def test_multiview_default_collate():
    torch.manual_seed(0)
    base = ArrayImageDataset(_images(n=5, size=20), np.array([0, 1, 2, 3, 4]))
    mv = MultiViewDataset(base, relational_augmentation(16, MEAN, STD), num_views=3)
    loader = DataLoader(mv, batch_size=4, shuffle=False, num_workers=0)
    views, labels = next(iter(loader))
    assert isinstance(views, list) and len(views) == 3
    for v in views:
        assert v.shape == (4, 3, 16, 16) and v.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    last_views, last_labels = list(loader)[-1]
    assert last_views[0].shape == (1, 3, 16, 16) and last_labels.tolist() == [4]


@pytest.mark.parametrize("k", [0, -2, 2.5, True, torch.tensor(True)])
def test_multiview_rejects_invalid_view_counts(k):
    base = ArrayImageDataset(_images(2))
    with pytest.raises(RelreasonError, match="the number of views per image must be a positive integer"):
        MultiViewDataset(base, eval_transform(32, MEAN, STD), num_views=k)


def test_multiview_takes_a_numpy_view_count_as_an_int():
    dataset = MultiViewDataset(ArrayImageDataset(_images(2)), eval_transform(32, MEAN, STD), num_views=np.int64(3))
    assert dataset.num_views == 3 and type(dataset.num_views) is int
    assert len(dataset[0][0]) == 3


def test_the_transforms_take_uint8_arrays_as_the_images_they_hold_and_refuse_other_input():
    rgb = _pil(seed=4)
    pixels = np.array(rgb)
    for transform in (eval_transform(16, MEAN, STD), relational_augmentation(16, MEAN, STD)):
        for image in (pixels, torch.from_numpy(pixels).permute(2, 0, 1)):  # a torchvision dataset's data items
            torch.manual_seed(1)
            got = transform(image)
            torch.manual_seed(1)
            assert torch.equal(got, transform(rgb))
    grey = np.array(rgb.convert("L"))
    for image in (grey, grey[..., None], torch.from_numpy(grey), grey.astype(np.uint16) * 257):  # 16-bit as PIL's I;16
        assert np.array_equal(np.asarray(ToRGB()(image)), np.asarray(rgb.convert("L").convert("RGB")))
    for bad, kind in [(torch.rand(3, 30, 40), r"got a torch.float32 Tensor shaped \(3, 30, 40\)"),
                      (pixels[..., :2], r"got a uint8 ndarray shaped \(30, 40, 2\)"), ("photo.png", "got str"),
                      (torch.zeros(2, 3, 4, 5, dtype=torch.uint8), r"got a torch.uint8 Tensor shaped \(2, 3, 4, 5\)")]:
        with pytest.raises(RelreasonError, match=rf"take one image \(a PIL image, .*\), {kind}; convert it so"):
            relational_augmentation(16, MEAN, STD)(bad)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_both_transforms_take_a_pil_image_of_any_mode(mode):
    rgb = _pil(seed=3)
    image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 256) if mode == "I;16" else rgb.convert(mode)
    assert image.mode == mode
    assert eval_transform(16, MEAN, STD)(image).shape == (3, 16, 16)
    converted = np.asarray(ToRGB()(image))
    assert converted.shape == (30, 40, 3) and converted.dtype == np.uint8
    if mode in ("L", "I;16"):  # grey levels in every channel; 16-bit divided by 257, not clipped to 255
        grey = np.asarray(rgb.convert("L"), dtype=np.float64)
        expected = grey if mode == "L" else np.rint(grey * 256 / 257)
        assert all(np.array_equal(converted[..., c], expected) for c in range(3))
    torch.manual_seed(0)
    assert relational_augmentation(16, MEAN, STD)(image).shape == (3, 16, 16)
    # RGB images pass through untouched: the step changes nothing for the RGB datasets' views.
    assert torch.equal(eval_transform(16, MEAN, STD)(rgb), T.Compose(eval_transform(16, MEAN, STD).transforms[1:])(rgb))
