import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_files_support import address_space_limit, make_fifo, make_symlink_loop, no_hang

from fastdiff.data import (
    ArrayDataset,
    DigitsDataset,
    ImageFolderDataset,
    get_dataset,
    save_image_grid,
)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the [0, 255] -> [-1, 1] map; exact for data that came from uint8."""
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()


def write_png(path, array: np.ndarray, mode: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path)
    return path


def rng_image(seed: int, h: int, w: int, c: int | None = None) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------------
# DigitsDataset


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def digits():
    return {split: DigitsDataset(split=split) for split in ("all", "train", "test")}


def test_digits_all_is_the_whole_set_at_16(digits):
    ds = digits["all"]
    assert len(ds) == 1797 and ds.shape == (1, 16, 16) and ds.num_classes == 10
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == torch.float32
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    # The source uses the full 0..16 ink range, so both ends are reached.
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (1797,)
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    image, label = ds[5]
    assert image.shape == (1, 16, 16) and label.dtype == torch.int64 and label.ndim == 0
    assert torch.equal(image, ds.images[5]) and label == ds.labels[5]


def test_digits_resolution_8_is_the_sklearn_pixels(sk_digits):
    ds = DigitsDataset(resolution=8)
    assert ds.shape == (1, 8, 8)
    assert np.array_equal(((ds.images[:, 0] + 1) * 8).double().numpy(), sk_digits.images)
    assert np.array_equal(ds.labels.numpy(), sk_digits.target)


def test_digits_resolution_32_upsamples_within_range():
    ds = DigitsDataset(resolution=32, split="test")
    assert ds.images.shape == (len(ds), 1, 32, 32)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_digits_split_is_disjoint_covering_stratified_and_fixed(digits, sk_digits):
    train, test, full = digits["train"], digits["test"], digits["all"]
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert not tr & te and tr | te == set(range(1797))
    assert len(train) + len(test) == 1797
    counts_all = torch.bincount(full.labels, minlength=10)
    counts_test = torch.bincount(test.labels, minlength=10)
    assert (counts_test > 0).all()
    # Every class holds out 20% of its members, rounded.
    assert ((counts_test - 0.2 * counts_all).abs() <= 0.5).all()
    # Each split image and label is the one at its index of the full set.
    assert torch.equal(test.images, full.images[test.indices])
    assert torch.equal(train.labels, torch.from_numpy(sk_digits.target)[train.indices])
    assert torch.equal(DigitsDataset(resolution=8, split="test").indices, test.indices)
    # Golden values: the documented rule (seed-0 permutation, last 20% per class) must not drift between versions.
    assert len(test) == 359 and test.indices[:8].tolist() == [11, 23, 24, 25, 28, 32, 33, 36]
    assert int(test.indices.sum()) == 322238


@pytest.mark.parametrize("resolution", [4, 12, 64, True, "16", None])
def test_digits_rejects_other_resolutions(resolution):
    with pytest.raises(ValueError, match=r"resolution must be one of \(8, 16, 32\)"):
        DigitsDataset(resolution=resolution)


def test_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'all'"):
        DigitsDataset(split="val")


# --------------------------------------------------------------------------------------------------------------
# ImageFolderDataset


def test_folder_with_classes_round_trips_png_and_labels(tmp_path):
    a = rng_image(0, 5, 7, 3)
    b = rng_image(1, 5, 7, 3)
    c = rng_image(2, 5, 7, 3)
    write_png(tmp_path / "dogs" / "x.png", a)
    write_png(tmp_path / "cats" / "y.PNG", b)
    write_png(tmp_path / "cats" / "nested" / "z.png", c)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert ds.shape == (3, 5, 7) and ds.images.dtype == torch.float32 and len(ds) == 3
    by_name = {p.name: i for i, p in enumerate(ds.files)}
    for name, array, label in [("x.png", a, 1), ("y.PNG", b, 0), ("z.png", c, 0)]:
        image, y = ds[by_name[name]]
        assert np.array_equal(to_uint8(image).transpose(1, 2, 0), array)
        assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == label
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.skipped == []


def test_flat_folder_is_unlabelled_and_reads_jpeg(tmp_path):
    grey = rng_image(3, 6, 6)
    write_png(tmp_path / "a.png", grey)
    Image.new("L", (6, 6), 200).save(tmp_path / "b.JPEG")
    Image.new("L", (6, 6), 40).save(tmp_path / "c.jpg")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and ds.num_classes == 0
    assert ds.labels.tolist() == [-1, -1, -1]
    assert ds.shape == (1, 6, 6)
    assert np.array_equal(to_uint8(ds.images[0, 0]), grey)
    # JPEG is lossy, but a flat grey survives within a level or two.
    assert np.abs(to_uint8(ds.images[1]).astype(int) - 200).max() <= 2
    assert np.abs(to_uint8(ds.images[2]).astype(int) - 40).max() <= 2


def test_channel_inference_and_conversion(tmp_path):
    grey = rng_image(4, 4, 4)
    write_png(tmp_path / "g" / "a.png", grey)
    assert ImageFolderDataset(tmp_path / "g").shape == (1, 4, 4)
    # A colour image makes the whole set RGB; the grey one is copied into all three channels.
    write_png(tmp_path / "g" / "b.png", np.full((4, 4, 3), (255, 0, 0), dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path / "g")
    assert ds.shape == (3, 4, 4)
    assert all(np.array_equal(to_uint8(ds.images[0, k]), grey) for k in range(3))
    # Forced greyscale uses PIL's luma: red (255, 0, 0) -> 255 * 299 / 1000 = 76.
    ds1 = ImageFolderDataset(tmp_path / "g", channels=1)
    assert ds1.shape == (1, 4, 4) and (to_uint8(ds1.images[1]) == 76).all()
    # Alpha is dropped; RGBA still gives 3 channels with the colour intact.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 1], rgba[..., 3] = 123, 77
    write_png(tmp_path / "rgba" / "a.png", rgba)
    ds = ImageFolderDataset(tmp_path / "rgba")
    assert ds.shape == (3, 4, 4) and np.array_equal(to_uint8(ds.images[0]).transpose(1, 2, 0), rgba[..., :3])


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((3, 3), 65535 // 2, dtype=np.uint16)).save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.shape == (1, 3, 3) and (to_uint8(ds.images) == 127).all()


def test_resize_to_resolution_and_size_mismatch(tmp_path):
    write_png(tmp_path / "big.png", np.full((10, 14, 3), (10, 100, 250), dtype=np.uint8))
    write_png(tmp_path / "small.png", np.full((3, 3, 3), (200, 50, 0), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"big\.png is 14x10.*small\.png is 3x3.*resolution="):
        ImageFolderDataset(tmp_path)
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds.shape == (3, 8, 8)
    # Bicubic resampling of a flat colour gives the same flat colour.
    px = to_uint8(ds.images).transpose(0, 2, 3, 1)
    assert (px[0] == (10, 100, 250)).all() and (px[1] == (200, 50, 0)).all()


def test_hidden_folders_are_ignored(tmp_path):
    write_png(tmp_path / "a" / "x.png", rng_image(5, 2, 2))
    write_png(tmp_path / ".ipynb_checkpoints" / "x.png", rng_image(6, 2, 2))
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["a"] and len(ds) == 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolderDataset(tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found under .*empty.*\.png, \.jpg, \.jpeg"):
        ImageFolderDataset(empty)
    mixed = tmp_path / "mixed"
    write_png(mixed / "top.png", rng_image(7, 2, 2))
    write_png(mixed / "cls" / "inner.png", rng_image(8, 2, 2))
    with pytest.raises(ValueError, match=r"both directly \(top\.png\) and in subfolders"):
        ImageFolderDataset(mixed)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        ImageFolderDataset(mixed, on_error="ignore")
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolderDataset(mixed, channels=2)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        ImageFolderDataset(mixed, resolution=0)


def test_corrupt_file_raises_or_is_skipped_with_one_warning(tmp_path):
    good = rng_image(9, 4, 4)
    write_png(tmp_path / "a_good.png", good)
    bad = tmp_path / "b_bad.png"
    bad.write_bytes(b"definitely not a png" * 8)
    with pytest.raises(ValueError, match=r"cannot read image .*b_bad\.png"):
        ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) of 2") as record:
        ds = ImageFolderDataset(tmp_path, on_error="skip")
    assert len(record) == 1
    assert ds.skipped == [bad] and len(ds) == 1 and ds.files == [tmp_path / "a_good.png"]
    assert np.array_equal(to_uint8(ds.images[0, 0]), good)
    (tmp_path / "a_good.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="none of the 2 image files"):
        ImageFolderDataset(tmp_path, on_error="skip")


# --------------------------------------------------------------------------------------------------------------
# ArrayDataset


def test_npy_greyscale_uint8(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    a[0, 0, 0], a[0, 0, 1] = 0, 255
    np.save(tmp_path / "x.npy", a)
    ds = ArrayDataset(tmp_path / "x.npy")
    assert len(ds) == 6 and ds.shape == (1, 5, 4) and ds.images.dtype == torch.float32
    assert ds.images[0, 0, 0, 0] == -1 and ds.images[0, 0, 0, 1] == 1
    assert np.array_equal(to_uint8(ds.images[:, 0]), a)
    assert ds.labels.tolist() == [-1] * 6 and ds.num_classes == 0


def test_npz_with_labels_channels_first(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 3), dtype=np.uint8)  # [N, C, H, W] by the rule
    np.savez(tmp_path / "d.npz", images=a, labels=np.array([0, 2, 1, 2], dtype=np.int32))
    ds = ArrayDataset(tmp_path / "d.npz")
    assert ds.shape == (3, 5, 3) and ds.num_classes == 3
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 2, 1, 2]
    assert np.array_equal(to_uint8(ds.images), a)
    image, label = ds[1]
    assert image.shape == (3, 5, 3) and label.ndim == 0 and int(label) == 2


def test_channels_last_float_and_key_choice(tmp_path):
    a = np.random.default_rng(2).uniform(-1, 1, (3, 6, 5, 3)).astype(np.float64)
    np.savez(tmp_path / "x.npz", x=a, other=np.zeros(3))
    ds = ArrayDataset(tmp_path / "x.npz", labels_key=None)
    assert ds.shape == (3, 6, 5) and ds.images.dtype == torch.float32 and ds.key == "x"
    assert torch.allclose(ds.images, torch.from_numpy(a).float().permute(0, 3, 1, 2))
    # The only array besides the labels is taken whatever its name; key= picks explicitly.
    np.savez(tmp_path / "only.npz", pictures=a[..., :1], labels=np.arange(3))
    ds = ArrayDataset(tmp_path / "only.npz")
    assert ds.key == "pictures" and ds.shape == (1, 6, 5) and ds.labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "two.npz", a=a, b=a[:, :, :, 0])
    assert ArrayDataset(tmp_path / "two.npz", key="b").shape == (1, 6, 5)
    with pytest.raises(ValueError, match=r"cannot tell which array.*\['a', 'b'\].*key="):
        ArrayDataset(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"no array 'c'; its arrays: \['a', 'b'\]"):
        ArrayDataset(tmp_path / "two.npz", key="c")
    with pytest.raises(ValueError, match="no labels array 'y'"):
        ArrayDataset(tmp_path / "two.npz", key="a", labels_key="y")


def test_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        ArrayDataset(tmp_path / "missing.npy")
    (tmp_path / "a.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"must be a \.npy or \.npz file"):
        ArrayDataset(tmp_path / "a.txt")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy holds an object array.*never unpickled"):
        ArrayDataset(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="obj.npz holds an object array"):
        ArrayDataset(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match=r"cannot read .*junk\.npz"):
        ArrayDataset(tmp_path / "junk.npz")
    imgs = np.zeros((4, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "count.npz", images=imgs, labels=np.arange(3))
    with pytest.raises(ValueError, match=r"labels 'labels' have shape \(3,\), but there are 4 images"):
        ArrayDataset(tmp_path / "count.npz")
    np.savez(tmp_path / "floatlab.npz", images=imgs, labels=np.zeros(4))
    with pytest.raises(ValueError, match="must be integers, got dtype float64"):
        ArrayDataset(tmp_path / "floatlab.npz")
    np.savez(tmp_path / "neglab.npz", images=imgs, labels=np.array([0, 1, -2, 1]))
    with pytest.raises(ValueError, match="-1 for none"):
        ArrayDataset(tmp_path / "neglab.npz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 8, 8\)\)"):
        ArrayDataset(tmp_path / "empty.npy")
    np.save(tmp_path / "range.npy", np.linspace(0, 255, 2 * 16).reshape(2, 4, 4))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], but their values span \[0, 255\]"):
        ArrayDataset(tmp_path / "range.npy")
    np.save(tmp_path / "nan.npy", np.full((1, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ArrayDataset(tmp_path / "nan.npy")
    np.save(tmp_path / "int.npy", np.zeros((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="uint8 .* or float .*got dtype int64"):
        ArrayDataset(tmp_path / "int.npy")
    np.save(tmp_path / "flat.npy", np.zeros((2, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 16\) are not \[N, H, W\]"):
        ArrayDataset(tmp_path / "flat.npy")
    np.save(tmp_path / "c5.npy", np.zeros((2, 5, 6, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        ArrayDataset(tmp_path / "c5.npy")
    with pytest.raises(ValueError, match="a .npy file holds just one"):
        ArrayDataset(tmp_path / "c5.npy", key="images")


def test_float_slightly_outside_is_clamped(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[[-1.005, 1.005]]], dtype=np.float32))
    ds = ArrayDataset(tmp_path / "f.npy")
    assert ds.images.min() == -1 and ds.images.max() == 1


# --------------------------------------------------------------------------------------------------------------
# get_dataset


def test_get_dataset_dispatch(tmp_path):
    ds = get_dataset("digits", split="test")
    assert isinstance(ds, DigitsDataset) and ds.shape == (1, 16, 16) and ds.split == "test"
    assert get_dataset("digits", resolution=8, split="test").shape == (1, 8, 8)
    write_png(tmp_path / "imgs" / "a.png", rng_image(0, 5, 5, 3))
    ds = get_dataset(str(tmp_path / "imgs"), resolution=4, channels=1)
    assert isinstance(ds, ImageFolderDataset) and ds.shape == (1, 4, 4)
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), dtype=np.uint8))
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4), dtype=np.uint8))
    assert isinstance(get_dataset(str(tmp_path / "a.npz"), resolution=4), ArrayDataset)
    assert get_dataset(str(tmp_path / "a.npy")).shape == (1, 4, 4)


def test_get_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset 'mnist'.*'digits', a folder.*\.npy/\.npz"):
        get_dataset("mnist")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"accepted are 'digits', a folder of PNG/JPEG images, or a \.npy/\.npz"):
        get_dataset(str(tmp_path / "data.csv"))
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="not resampled"):
        get_dataset(str(tmp_path / "a.npy"), resolution=8)
    with pytest.raises(ValueError, match="resolution must be one of"):
        get_dataset("digits", resolution=28)


# --------------------------------------------------------------------------------------------------------------
# save_image_grid


def test_image_grid_round_trip_greyscale(tmp_path):
    u = np.random.default_rng(0).integers(0, 256, (5, 1, 3, 4), dtype=np.uint8)
    x = torch.from_numpy(u).float() / 127.5 - 1
    path = save_image_grid(x, tmp_path / "out" / "grid.png", nrow=3, scale=2)
    assert path == tmp_path / "out" / "grid.png"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # the temporary file is gone
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (3 * 8 + 2, 2 * 6 + 1)  # (W, H): 3 columns, 2 rows, 1-px gaps
        g = np.asarray(im)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = g[r * 7 : r * 7 + 6, c * 9 : c * 9 + 8]
        assert np.array_equal(tile, u[i, 0].repeat(2, axis=0).repeat(2, axis=1))
    assert (g[6, :] == 255).all() and (g[:, 8] == 255).all() and (g[:, 17] == 255).all()
    assert (g[7:, 18:] == 255).all()  # the empty sixth cell


def test_image_grid_rgb_default_layout_and_clamping(tmp_path):
    x = torch.zeros(7, 3, 2, 2, dtype=torch.float64)
    x[:, 0] = 3.0  # clamped to 1 -> 255
    x[:, 1] = -1.0
    path = save_image_grid(x, tmp_path / "rgb.png")
    with Image.open(path) as im:
        cols = math.ceil(math.sqrt(7))
        assert im.mode == "RGB" and im.size == (cols * 3 - 1, 3 * 3 - 1)
        px = np.asarray(im)
    assert tuple(px[0, 0]) == (255, 0, 128)
    save_image_grid(x[:1], path)  # overwriting replaces the file
    with Image.open(path) as im:
        assert im.size == (2, 2)


def test_image_grid_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_image_grid(torch.zeros(1, 2, 2), tmp_path / "a.png")
    with pytest.raises(ValueError, match="ending in .png"):
        save_image_grid(torch.zeros(1, 1, 2, 2), tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_image_grid(torch.full((1, 1, 2, 2), float("nan")), tmp_path / "a.png")
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        save_image_grid(torch.zeros(1, 1, 2, 2), tmp_path / "a.png", scale=0)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Damaged and special files (issue 18)


def _edit_npy_header(path, old: str, new: str):
    """Rewrite the header dict of a .npy file in place, keeping its length (spaces pad it)."""
    data = path.read_bytes()
    start, end = 10, 10 + int.from_bytes(data[8:10], "little")
    header = data[start:end].decode("latin1")
    assert old in header
    edited = header.replace(old, new).rstrip(" \n")
    edited = edited + " " * (len(header) - 1 - len(edited)) + "\n"
    assert len(edited) == len(header)
    path.write_bytes(data[:start] + edited.encode("latin1") + data[end:])


def test_an_npy_header_that_disagrees_with_the_file_size_is_refused(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, rng_image(1, 5 * 4, 4).reshape(5, 4, 4))
    _edit_npy_header(path, "(5, 4, 4)", "(1, 4, 4)")  # one flipped bit: four images would vanish silently
    with pytest.raises(ValueError, match=r"a\.npy: its header describes 16 bytes of data .*file holds 80"):
        ArrayDataset(path)
    _edit_npy_header(path, "(1, 4, 4)", "(99999999999999, 4, 4)")
    with address_space_limit(), pytest.raises(ValueError, match=r"a\.npy: its header describes 1599999999999984 "):
        ArrayDataset(path)


def test_a_renamed_npz_member_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=rng_image(2, 3 * 4, 4).reshape(3, 4, 4), labels=np.array([0, 1, 2]))
    data = path.read_bytes()
    at = data.rindex(b"labels.npy")  # the central directory's copy of the name: a bit flip there drops the labels
    path.write_bytes(data[:at] + b"lafels.npy" + data[at + 10 :])
    with pytest.raises(ValueError, match=r"d\.npz is corrupt"):
        ArrayDataset(path)
    # one flipped bit in the first directory entry's comment length: its "comment" swallows the labels' entry
    entry = data.index(b"PK\x01\x02")
    damaged = bytearray(data)
    damaged[entry + 33] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"d\.npz is corrupt: its directory declares 2 members but lists 1"):
        ArrayDataset(path)


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = make_fifo(tmp_path / "pipe.npy")
    with no_hang():
        with pytest.raises(ValueError, match=r"pipe\.npy is not a regular file \(a FIFO"):
            ArrayDataset(fifo)
        with pytest.raises(ValueError, match=r"pipe\.npy is not a regular file \(a FIFO"):
            get_dataset(str(fifo))
    with pytest.raises(ValueError, match=r"loop\.npz.*symlink loop"):
        ArrayDataset(make_symlink_loop(tmp_path / "loop.npz"))
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(ValueError, match=r"dir\.npy is a directory"):
        ArrayDataset(tmp_path / "dir.npy")
    folder = tmp_path / "images"
    write_png(folder / "a.png", rng_image(3, 4, 4))
    make_fifo(folder / "b.png")
    with no_hang():
        with pytest.raises(ValueError, match=r"cannot read image .*b\.png: .*not a regular file \(a FIFO"):
            ImageFolderDataset(folder)
        with pytest.warns(UserWarning, match="skipped 1 unreadable"):
            ds = ImageFolderDataset(folder, on_error="skip")
    assert len(ds) == 1 and ds.skipped == [folder / "b.png"]
