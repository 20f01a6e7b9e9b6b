"""The batched on-device augmentation against torchvision's per-image pipeline: same operations, same laws."""

import itertools

import numpy as np
import pytest
import torch
from loop_reference import loop_augment
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from relreason import RelreasonError
from relreason.data import ArrayImageDataset, relational_augmentation
from relreason.data import batch_augment as ba
from relreason.data.batch_views import BatchViewLoader, DeviceMultiViewDataset, images_as_tensor
from relreason.data.sampler import EpochBatchSampler


def colour_images(num, height, width, seed=0):
    """Smooth colour images with edges: gradients, a bright disc and noise, so every operation has work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(num):
        a, b, c = rng.uniform(0, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
        img = a + b * x[..., None] + c * y[..., None]
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        img = img + rng.normal(0, 0.05, img.shape)
        images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def torchvision_boxes(num, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(num)])


@pytest.mark.parametrize("height,width", [(28, 28), (32, 32), (20, 40)])
def test_crop_boxes_follow_torchvision_distribution(height, width):
    ours = ba.sample_crop_boxes(20000, height, width, generator=torch.Generator().manual_seed(1))
    theirs = torchvision_boxes(20000, height, width)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= height).all() and (left + w <= width).all()

    def laws(boxes):
        top, left, h, w = boxes.double().T
        area = h * w / (height * width)
        aspect = torch.log(w / h)
        centre_x = (left + w / 2) / width
        return {"area": area, "log aspect": aspect, "centre x": centre_x}

    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    for name, (a, b) in {k: (v, laws(theirs)[k]) for k, v in laws(ours).items()}.items():
        assert torch.allclose(a.mean(), b.mean(), atol=0.01), name
        assert torch.allclose(torch.quantile(a, quantiles), torch.quantile(b, quantiles), atol=0.03), name


def test_crop_fallback_is_torchvision_central_crop():
    # No (area, ratio) draw fits a 10x100 strip at scale >= 0.5: torchvision's fallback, a centred crop.
    ours = ba.sample_crop_boxes(50, 10, 100, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(0))
    theirs = torchvision_boxes(50, 10, 100, scale=(0.5, 1.0))
    assert torch.equal(ours, theirs)
    assert ours[0].tolist() == [0, 43, 10, 13]


@pytest.mark.parametrize("box,size", [((3, 2, 20, 17), 32), ((0, 0, 28, 28), 32), ((5, 1, 22, 26), 12), ((0, 0, 28, 28), 28)])
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_equals_pil_bilinear(box, size, flip):
    image = colour_images(1, 28, 28, seed=3)[0]
    pil = TF.resized_crop(Image.fromarray(image), *box, [size, size], InterpolationMode.BILINEAR)
    if flip:
        pil = TF.hflip(pil)
    expected = TF.to_tensor(pil)
    source = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ours = ba.resized_crop(source, torch.tensor([box]), size, torch.tensor([flip]))[0]
    # PIL rounds to uint8 (and uses fixed-point weights): at most one grey level apart.
    assert (ours - expected).abs().max() <= 1.01 / 255


@pytest.mark.parametrize("operation,reference,low,high", [
    (ba.adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (ba.adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (ba.adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (ba.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_operations_equal_torchvision_tensor_functions(operation, reference, low, high):
    torch.manual_seed(0)
    images = torch.from_numpy(colour_images(12, 9, 11)).permute(0, 3, 1, 2).float() / 255
    images[0] = images[0].mean(0, keepdim=True)  # a grey image: hue and saturation leave it alone
    factors = torch.rand(12) * (high - low) + low
    expected = torch.stack([reference(image, factor.item()) for image, factor in zip(images, factors)])
    assert torch.allclose(operation(images, factors), expected, atol=1e-4)


def test_color_jitter_applies_each_views_order_only_where_selected():
    images = torch.from_numpy(colour_images(24, 8, 8, seed=5)).permute(0, 3, 1, 2).float() / 255
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders, one per view
    factors = torch.tensor([[1.6, 0.4, 1.7, 0.15]]).repeat(24, 1)
    jitter = torch.ones(24, dtype=torch.bool)
    jitter[5] = False
    out = ba.color_jitter(images, jitter, factors, orders)
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for view in range(24):
        expected = images[view]
        if jitter[view]:
            for op in orders[view].tolist():
                expected = functions[op](expected, factors[view, op].item())
        assert torch.allclose(out[view], expected, atol=1e-4), view
    assert not torch.allclose(out[0], out[23], atol=1e-3)  # the order matters


def test_greyscale_follows_the_jitter_as_in_torchvision():
    """RandomApply(ColorJitter) then RandomGrayscale: the hue shift changes the luma the greyscale keeps."""
    images = torch.from_numpy(colour_images(4, 16, 16, seed=8)).permute(0, 3, 1, 2).contiguous()
    params = ba.ViewParameters(
        boxes=torch.tensor([[0, 0, 16, 16]]).repeat(4, 1), flip=torch.zeros(4, dtype=torch.bool),
        jitter=torch.ones(4, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.2]]).repeat(4, 1),
        order=torch.arange(4).repeat(4, 1), grayscale=torch.tensor([True, True, False, False]),
    )
    views = ba.BatchRelationalAugmentation(16, (0.5,) * 3, (0.5,) * 3).apply(images, params, normalize=False)
    source = images.float() / 255
    shifted = TF.adjust_hue(source, 0.2)
    expected = torch.cat([TF.rgb_to_grayscale(shifted[:2], 3), shifted[2:]])
    assert torch.allclose(views, expected, atol=2e-3)
    assert not torch.allclose(views[:2], TF.rgb_to_grayscale(source[:2], 3), atol=2e-2)


def test_random_choices_have_the_recipe_rates_and_ranges():
    params = ba.sample_view_parameters(48000, 28, 28, generator=torch.Generator().manual_seed(2))
    assert params.flip.float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert params.jitter.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert params.grayscale.float().mean().item() == pytest.approx(0.2, abs=0.01)
    for column, (low, high) in enumerate([(0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2)]):
        factor = params.factors[:, column]
        assert factor.min() >= low and factor.max() <= high
        assert factor.mean().item() == pytest.approx((low + high) / 2, abs=0.01)
        assert factor.std().item() == pytest.approx((high - low) / 12**0.5, rel=0.02)  # uniform
    # Independent coins: jitter and greyscale together as often as the product of their rates.
    both = (params.jitter & params.grayscale).float().mean().item()
    assert both == pytest.approx(0.8 * 0.2, abs=0.01)
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()  # permutations
    counts = torch.unique(params.order, dim=0, return_counts=True)[1]
    assert counts.numel() == 24 and (counts.float() / 48000 - 1 / 24).abs().max() < 0.006


def test_per_channel_statistics_match_torchvision_pipeline():
    images = colour_images(6, 28, 28, seed=7)
    per_image = relational_augmentation(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    batched = ba.BatchRelationalAugmentation(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    views = 400
    torch.manual_seed(0)
    theirs = torch.stack([per_image(Image.fromarray(image)) for image in images for _ in range(views)])
    source = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ours = batched(source, views, torch.Generator().manual_seed(0)).transpose(0, 1).reshape(-1, 3, 32, 32)
    assert ours.shape == theirs.shape
    for a, b in ((ours, theirs), (ours.view(6, views, 3, 32, 32)[2], theirs.view(6, views, 3, 32, 32)[2])):
        assert torch.allclose(a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3)), atol=0.02)
        assert torch.allclose(a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3)), atol=0.02)
        # The spread across views (how different the views of one image are) matches too.
        assert torch.allclose(a.mean(dim=(2, 3)).std(dim=0), b.mean(dim=(2, 3)).std(dim=0), atol=0.02)


def test_normalisation_and_layout():
    images = torch.from_numpy(colour_images(5, 28, 28)).permute(0, 3, 1, 2).contiguous()
    augment = ba.BatchRelationalAugmentation(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    raw = ba.BatchRelationalAugmentation(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    views = augment(images, 3, torch.Generator().manual_seed(4))
    plain = raw(images, 3, torch.Generator().manual_seed(4))
    assert views.shape == (3, 5, 3, 16, 16) and views.dtype == torch.float32
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(views, (plain - mean) / std, atol=1e-5)
    assert plain.min() >= 0 and plain.max() <= 1
    assert not torch.allclose(plain[0], plain[1])  # views differ
    again = augment(images, 3, torch.Generator().manual_seed(4))
    assert torch.equal(views, again)  # a seed fixes the views


def test_device_dataset_and_loader_are_reproducible_per_step():
    grey = colour_images(10, 12, 12)[..., 0]
    dataset = ArrayImageDataset(grey, np.arange(10) % 3)
    tensor = images_as_tensor(dataset)
    assert tensor.shape == (10, 3, 12, 12) and torch.equal(tensor[:, 0], tensor[:, 2])
    views = DeviceMultiViewDataset(dataset, ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 2, seed=3)
    full = list(BatchViewLoader(views, EpochBatchSampler(10, 4, seed=3, epoch=0)))
    assert [v.shape for v, _ in full] == [(2, 4, 3, 8, 8), (2, 4, 3, 8, 8), (2, 2, 3, 8, 8)]
    resumed = list(BatchViewLoader(views, EpochBatchSampler(10, 4, seed=3, epoch=0, start_item=4)))
    for (a, la), (b, lb) in zip(full[1:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    views.set_epoch(1)
    next_epoch = list(BatchViewLoader(views, EpochBatchSampler(10, 4, seed=3, epoch=1)))
    assert not torch.equal(next_epoch[0][0], full[0][0])


def test_unseeded_views_come_from_the_global_generator():
    dataset = ArrayImageDataset(colour_images(6, 12, 12), np.arange(6) % 2)
    views = DeviceMultiViewDataset(dataset, ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 2)
    batches = [[0, 1, 2]]
    torch.manual_seed(5)
    first, labels = next(iter(BatchViewLoader(views, batches)))
    again, _ = next(iter(BatchViewLoader(views, batches)))
    torch.manual_seed(5)
    replayed, _ = next(iter(BatchViewLoader(views, batches)))
    assert first.shape == (2, 3, 3, 8, 8) and labels.tolist() == [0, 1, 0]
    assert not torch.equal(first, again) and torch.equal(first, replayed)
    with pytest.raises(RelreasonError, match=r"seed must be None or an integer in \[0, 2\*\*63 - 1\], got '3'"):
        DeviceMultiViewDataset(dataset, views.augmentation, 2, seed="3")
    numpy_seeded = DeviceMultiViewDataset(dataset, views.augmentation, 2, seed=np.int64(3))
    seeded = DeviceMultiViewDataset(dataset, views.augmentation, 2, seed=3)
    assert torch.equal(next(iter(BatchViewLoader(numpy_seeded, batches)))[0],
                       next(iter(BatchViewLoader(seeded, batches)))[0])


def test_subsets_and_torchvision_style_datasets_give_their_image_arrays(tmp_path):
    import torchvision
    from idx_files import write_idx
    from torch.utils.data import Subset

    rgb = colour_images(5, 12, 10)
    ours = ArrayImageDataset(rgb, np.arange(5))
    subset = Subset(ours, [4, 1])
    assert torch.equal(images_as_tensor(subset), images_as_tensor(ours)[[4, 1]])
    views = DeviceMultiViewDataset(subset, ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 2, seed=1)
    assert views.labels.tolist() == [4, 1]

    class TorchvisionStyle:  # CIFAR's layout: (N, H, W, C) and a list of targets; STL-10's: channels first
        def __init__(self, data, targets, transform=None, target_transform=None):
            self.data, self.targets, self.transform, self.target_transform = data, targets, transform, target_transform

    cifar_like = TorchvisionStyle(rgb, [3, 1, 4, 1, 5])
    assert torch.equal(images_as_tensor(cifar_like), images_as_tensor(ours))
    assert torch.equal(images_as_tensor(TorchvisionStyle(rgb.transpose(0, 3, 1, 2), None)), images_as_tensor(ours))
    views = DeviceMultiViewDataset(cifar_like, views.augmentation, 2, seed=1)
    assert views.labels.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(RelreasonError, match="a torchvision dataset's data without a transform"):
        images_as_tensor(TorchvisionStyle(rgb, [0] * 5, transform=T.ToTensor()))  # its transform would be skipped
    with pytest.raises(RelreasonError, match="a torchvision dataset's data without a transform"):
        images_as_tensor(TorchvisionStyle(rgb, [0] * 5, target_transform=lambda y: y % 2))  # and its labels
    with pytest.raises(RelreasonError, match=r"shape \(2, 3, 8, 3\) reads as channels first and as channels last"):
        images_as_tensor(TorchvisionStyle(np.zeros((2, 3, 8, 3), np.uint8), [0, 1]))

    grey = colour_images(4, 28, 28)[..., 0]
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([7, 0, 2, 9], dtype=np.uint8), compress=False)
    for prefix in ("train", "t10k"):  # torchvision looks for both splits' files
        write_idx(raw / f"{prefix}-images-idx3-ubyte", grey, compress=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.array([7, 0, 2, 9], dtype=np.uint8), compress=False)
    fashion = torchvision.datasets.FashionMNIST(str(tmp_path), train=False)  # torchvision's own, from its files
    tensor = images_as_tensor(fashion, keep_grey=True)
    assert tensor.shape == (4, 1, 28, 28) and torch.equal(tensor[:, 0], torch.from_numpy(grey))
    views = DeviceMultiViewDataset(fashion, views.augmentation, 2, seed=1)
    assert views.labels.tolist() == [7, 0, 2, 9]


def test_datasets_without_an_image_array_are_refused():
    with pytest.raises(RelreasonError, match="MultiViewDataset; on the command line, --augment pil"):
        images_as_tensor([(Image.new("RGB", (4, 4)), 0)])


def test_loader_takes_any_batch_sampler_and_views_take_index_lists():
    dataset = ArrayImageDataset(colour_images(6, 12, 12), np.arange(6) % 2)
    views = DeviceMultiViewDataset(dataset, ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 2, seed=3)
    sampler = EpochBatchSampler(6, 3, seed=3, epoch=0)
    ours = list(BatchViewLoader(views, sampler))
    theirs = list(BatchViewLoader(views, [list(batch) for batch in sampler]))  # no start_step: from step 0
    assert len(theirs) == 2
    for (a, la), (b, lb) in zip(ours, theirs):  # same batches, same step seeds
        assert torch.equal(a, b) and torch.equal(la, lb)
    from_list, labels = views.views([0, 2, 4])
    assert from_list.shape == (2, 3, 3, 8, 8) and labels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("images, problem", [
    (torch.rand(4, 3, 12, 12), "must be uint8"),  # float in [0, 1]: would be divided by 255 twice
    (torch.zeros(4, 12, 12, 3, dtype=torch.uint8), "permute"),  # channels last
    (torch.zeros(4, 4, 12, 12, dtype=torch.uint8), r"got \(4, 4, 12, 12\); drop the alpha"),  # RGBA
    (torch.zeros(4, 12, 12, 4, dtype=torch.uint8), r"images\[\.\.\., :3\]\.permute\(0, 3, 1, 2\)"),  # RGBA, last
    (torch.zeros(3, 12, 12, dtype=torch.uint8), r"\(B, 1 or 3, H, W\).*unsqueeze\(0\)"),  # one image, no batch axis
    (torch.zeros(2, 2, 5, 12, 12, dtype=torch.uint8), r"\(B, 1 or 3, H, W\).*; pass a batch of RGB or grey images"),
    (np.zeros((4, 3, 12, 12), dtype=np.uint8), "uint8 tensor"),
])
def test_batched_augmentation_refuses_other_inputs(images, problem):
    augment = ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(RelreasonError, match=problem):
        augment(images, 2)


def test_batched_augmentation_refuses_no_views():
    augment = ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(RelreasonError, match="num_views must be a positive integer"):
        augment(torch.zeros(2, 3, 12, 12, dtype=torch.uint8), 0)


def test_accelerator_branch_of_the_jitter_gives_the_same_views(monkeypatch):
    """On an accelerator every view is computed and the selected ones kept; here on the CPU, against the
    CPU branch that computes the selected views only."""
    images = torch.from_numpy(colour_images(12, 12, 12, seed=4)).permute(0, 3, 1, 2).float() / 255
    params = ba.sample_view_parameters(12, 12, 12, generator=torch.Generator().manual_seed(5))
    assert 0 < params.jitter.sum() < 12
    listed = ba.color_jitter(images, params.jitter, params.factors, params.order)
    monkeypatch.setattr(ba, "_lists_selected", lambda device: False)
    kept = ba.color_jitter(images, params.jitter, params.factors, params.order)
    assert torch.allclose(listed, kept, atol=1e-6)
    assert torch.equal(kept[~params.jitter], images[~params.jitter])
    assert not torch.allclose(kept[params.jitter], images[params.jitter])


def test_ranks_draw_different_views_of_the_same_step():
    dataset = ArrayImageDataset(colour_images(8, 12, 12), np.zeros(8, dtype=int))
    views = DeviceMultiViewDataset(dataset, ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 2, seed=3)
    batches = [[0, 1, 2, 3]]  # the same images on both ranks: only the rank tells their views apart
    rank_0 = next(iter(BatchViewLoader(views, batches, rank=0)))[0]
    rank_1 = next(iter(BatchViewLoader(views, batches, rank=1)))[0]
    assert not torch.allclose(rank_0, rank_1)
    assert torch.equal(rank_0, next(iter(BatchViewLoader(views, batches, rank=0)))[0])


def test_compiled_colour_operations_give_the_same_views():
    images = torch.from_numpy(colour_images(6, 12, 12, seed=9)).permute(0, 3, 1, 2).contiguous()
    plain = ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.25,) * 3)
    compiled = ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.25,) * 3, compile=True)
    for seed in (0, 1):  # two steps: different numbers of selected views per operation
        a = plain(images, 4, torch.Generator().manual_seed(seed))
        b = compiled(images, 4, torch.Generator().manual_seed(seed))
        assert torch.allclose(a, b, atol=1e-5)


def test_grey_images_make_the_views_of_their_three_channel_copies():
    grey = torch.from_numpy(colour_images(6, 12, 12, seed=2)[..., 0]).unsqueeze(1)  # (6, 1, 12, 12)
    as_rgb = grey.expand(-1, 3, -1, -1).contiguous()
    augment = ba.BatchRelationalAugmentation(8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    for seed in (0, 1):
        one = augment(grey, 4, torch.Generator().manual_seed(seed))
        three = augment(as_rgb, 4, torch.Generator().manual_seed(seed))
        assert one.shape == three.shape == (4, 6, 3, 8, 8)
        assert torch.allclose(one, three, atol=1e-5)
    params = augment.sample_parameters(6, 12, 12, torch.Generator().manual_seed(3))
    plain = augment.apply(grey, params, normalize=False)
    assert plain.shape == (6, 3, 8, 8)
    assert torch.allclose(plain, augment.apply(as_rgb, params, normalize=False), atol=1e-6)


def test_device_dataset_keeps_grey_images_as_one_channel():
    grey = colour_images(5, 12, 12)[..., 0]
    views = DeviceMultiViewDataset(
        ArrayImageDataset(grey, np.arange(5)), ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.5,) * 3), 3, seed=0
    )
    assert views.images.shape == (5, 1, 12, 12)
    batch, labels = views.views(torch.tensor([4, 0]), torch.Generator().manual_seed(0))
    assert batch.shape == (3, 2, 3, 8, 8) and labels.tolist() == [4, 0]


@pytest.mark.parametrize("in_size,out_size", [(28, 32), (12, 8), (32, 32)])
def test_interpolation_table_lookup_equals_building_the_matrices(in_size, out_size):
    generator = torch.Generator().manual_seed(in_size)
    boxes = ba.sample_crop_boxes(500, in_size, in_size, generator=generator)
    flip = torch.rand(500, generator=generator) < 0.5
    for start, length, mirrored in ((boxes[:, 0], boxes[:, 2], None), (boxes[:, 1], boxes[:, 3], flip)):
        looked_up = ba._line_matrices(start, length, in_size, out_size, mirrored)
        built = ba._interpolation_matrices(start, length, in_size, out_size, mirrored)
        assert torch.equal(looked_up, built)
    full = torch.tensor([0]), torch.tensor([in_size])  # the whole line, the largest length
    assert torch.equal(ba._line_matrices(*full, in_size, out_size), ba._interpolation_matrices(*full, in_size, out_size))


def test_recipe_from_options_matches_the_per_image_pipeline_and_refuses_bad_values():
    recipe = ba.AugmentationRecipe.from_options(min_crop_scale=0.3, jitter_strength=0.5)
    assert recipe.scale == (0.3, 1.0)
    assert (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert ba.AugmentationRecipe.from_options() == ba.AugmentationRecipe()  # the paper's
    crop, jitter = (t for t in relational_augmentation(32, (0.5,) * 3, (0.5,) * 3, 0.3, 0.5).transforms
                    if isinstance(t, (T.RandomResizedCrop, T.RandomApply)))
    assert crop.scale == recipe.scale
    assert jitter.transforms[0].brightness == (1 - recipe.brightness, 1 + recipe.brightness)
    assert jitter.transforms[0].hue == (-recipe.hue, recipe.hue)
    with pytest.raises(RelreasonError, match="--min-crop-scale"):
        ba.AugmentationRecipe.from_options(min_crop_scale=0)
    with pytest.raises(RelreasonError, match="--jitter-strength"):
        ba.AugmentationRecipe.from_options(jitter_strength=3)


@pytest.mark.parametrize("change, problem", [
    ({"hue": 0.7}, "hue must lie in"),
    ({"scale": (0.5, 2.0)}, "crop scale must satisfy"),
    ({"scale": 0.5}, "two numbers"),
    ({"ratio": (2.0, 1.0)}, "aspect ratio must satisfy"),
    ({"flip_p": 1.5}, "flip_p is a probability"),
    ({"grayscale_p": -0.1}, "grayscale_p is a probability"),
    ({"brightness": -1.0}, "brightness must be a finite number >= 0"),
    ({"contrast": float("nan")}, "contrast must be a finite number >= 0"),
])
def test_a_recipe_outside_torchvisions_ranges_is_refused(change, problem):
    with pytest.raises(RelreasonError, match=problem):
        ba.AugmentationRecipe(**change)
    ba.AugmentationRecipe(**{key: ba.AugmentationRecipe.__dataclass_fields__[key].default for key in change})


def test_view_counts_of_numpy_and_torch_integer_types_are_taken():
    augment = ba.BatchRelationalAugmentation(8, (0.5,) * 3, (0.25,) * 3)
    images = torch.zeros(2, 3, 12, 12, dtype=torch.uint8)
    for count in (np.int64(3), torch.tensor(3)):
        assert augment(images, count, torch.Generator().manual_seed(0)).shape == (3, 2, 3, 8, 8)
    assert augment.image_size == 8 and type(ba.BatchRelationalAugmentation(np.int64(8), (0.5,) * 3, (0.25,) * 3)
                                            .image_size) is int


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_views_equal_views_made_one_at_a_time(channels):
    """The whole batched pipeline (crop box, flip, jitter order and factors, greyscale, normalisation) against a
    per-view loop of PIL and torchvision operations with the same random choices."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, channels, 20, 24), dtype=np.uint8))
    augment = ba.BatchRelationalAugmentation(12, mean, std)
    params = augment.sample_parameters(64, 20, 24, torch.Generator().manual_seed(1))
    assert params.flip.any() and (~params.flip).any() and params.grayscale.any() and (~params.jitter).any()
    assert (params.boxes[:, 2] != params.boxes[:, 3]).any()  # crops that are not square: swapped axes would show
    expected = loop_augment(images.expand(-1, 3, -1, -1), params, 12, mean, std)
    torch.testing.assert_close(augment.apply(images, params), expected, atol=2e-3, rtol=0)
