"""Small real image datasets for training diffusion models, preloaded as tensors, and a PNG grid writer.

Every dataset here is a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs:

- ``image``: float32 ``[C, H, W]`` scaled to ``[-1, 1]`` (the range the EDM preconditioning assumes);
- ``label``: int64 0-d tensor, the class index, or ``-1`` where the dataset has no labels.

The datasets are small, so the whole of each is loaded once and kept as ``.images`` (float32 ``[N, C, H, W]``)
and ``.labels`` (int64 ``[N]``): the training loops and the metrics index those tensors directly instead of
going through a ``DataLoader``. Each also has ``.shape`` (``(C, H, W)``) and ``.num_classes`` (0 if unlabelled).

- :class:`DigitsDataset`: scikit-learn's bundled UCI handwritten digits; real data that needs no download.
- :class:`ImageFolderDataset`: PNG/JPEG files under a directory, one class per subdirectory (or none).
- :class:`ArrayDataset`: a ``.npy``/``.npz`` array, loaded without ever unpickling.
- :func:`get_dataset`: one of the above from a command-line string.
- :func:`save_image_grid`: write a batch of ``[-1, 1]`` images as one PNG grid.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from fastdiff.checkpoint import atomic_write, check_regular_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARRAY_EXTENSIONS = (".npy", ".npz")
DIGITS_RESOLUTIONS = (8, 16, 32)
DIGITS_TEST_FRACTION = 0.2

# PIL modes that hold one grey band (plus, for "LA"/"La", an alpha band that is dropped).
_GREY_MODES = ("1", "L", "LA", "La")


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``; 0 and 255 land exactly on -1 and 1."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class _PreloadedImages(Dataset):
    """Base of the datasets here: ``images`` float32 ``[N, C, H, W]`` in ``[-1, 1]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def _set(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.num_classes = int(num_classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, shape={self.shape}, num_classes={self.num_classes})"

    def with_classes(self, classes: Sequence[int]) -> _PreloadedImages:
        """A copy holding only the items whose label is in ``classes``. Labels and ``num_classes`` are unchanged,
        so a conditional model trained on every class still fits (fine-tuning on held-out classes)."""
        wanted = sorted({int(c) for c in classes})
        bad = [c for c in wanted if not 0 <= c < self.num_classes]
        if not wanted or bad:
            raise ValueError(f"classes must be a non-empty subset of 0..{self.num_classes - 1}, got {list(classes)}")
        keep = torch.isin(self.labels, torch.tensor(wanted))
        out = copy.copy(self)
        out._set(self.images[keep], self.labels[keep], self.num_classes)
        return out


# --------------------------------------------------------------------------------------------------------------
# scikit-learn digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels [1797, 8, 8] float64 in 0..16, targets [1797] int64)``, read once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is only needed for this dataset
        raise ImportError("DigitsDataset needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    pixels, targets = digits.images.astype(np.float64), digits.target.astype(np.int64)
    pixels.flags.writeable = targets.flags.writeable = False  # shared through the cache
    return pixels, targets


def _digits_split_indices(targets: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices into the sklearn order of the ``split`` ("train", "test" or "all") samples."""
    n = targets.shape[0]
    if split == "all":
        return np.arange(n)
    # The legacy RandomState stream is frozen by NumPy's compatibility policy, so the split never moves.
    order = np.random.RandomState(0).permutation(n)
    test = []
    for c in np.unique(targets):
        members = order[targets[order] == c]
        n_test = round(DIGITS_TEST_FRACTION * len(members))
        test.append(members[len(members) - n_test :])
    is_test = np.zeros(n, dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsDataset(_PreloadedImages):
    """The UCI handwritten digits bundled with scikit-learn (``sklearn.datasets.load_digits``): 1797 real 8x8
    greyscale scans of the digits 0-9, 10 classes, no download.

    Images are float32 ``[1, resolution, resolution]`` in ``[-1, 1]`` (the source's 0..16 ink levels mapped
    linearly, 0 -> -1 and 16 -> 1), then upsampled from 8x8 with bilinear interpolation
    (``align_corners=False``), which stays inside ``[-1, 1]``. Labels are the digits, int64.

    Args:
        resolution: 8, 16 or 32. The default 16 is the smallest power-of-two size at which a UNet with two
            downsamplings still has a 4x4 bottleneck, and training a model on it takes CPU-minutes. 32 adds
            nothing: the 8x8 source has no detail a 32x32 model could learn, and every step costs 4x the compute.
        split: ``"all"`` (1797 images), ``"train"`` (1438) or ``"test"`` (359), so that a classifier can be
            scored on digits the generative model never saw. The split is fixed and stratified: the samples are
            permuted once with seed 0, and the last 20% (rounded) of each class in that order form the test set.
            Within a split, images keep scikit-learn's order.

    ``.indices`` (int64 ``[N]``) gives each image's position in ``load_digits()``.
    """

    def __init__(self, resolution: int = 16, split: str = "all"):
        if isinstance(resolution, bool) or resolution not in DIGITS_RESOLUTIONS:
            raise ValueError(
                f"DigitsDataset resolution must be one of {DIGITS_RESOLUTIONS} (the 8x8 source upsampled), "
                f"got {resolution!r}"
            )
        if split not in ("train", "test", "all"):
            raise ValueError(f"DigitsDataset split must be 'train', 'test' or 'all', got {split!r}")
        pixels, targets = _digits_raw()
        idx = _digits_split_indices(targets, split)
        # x / 8 - 1 is exact in float32 for the integer ink levels 0..16, so resolution 8 keeps the data bit-exact.
        x = torch.from_numpy(pixels[idx]).to(torch.float32).div_(8.0).sub_(1.0).unsqueeze(1)
        if resolution != 8:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.resolution = resolution
        self.split = split
        self.indices = torch.from_numpy(idx.astype(np.int64))
        self._set(x, torch.from_numpy(targets[idx].copy()), num_classes=10)

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, shape={self.shape}, num_classes=10)"


# --------------------------------------------------------------------------------------------------------------
# A folder of PNG/JPEG files


def _find_images(root: Path) -> list[Path]:
    """Image files under ``root``, relative to it, sorted; follows symlinks, skips hidden files and folders."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden folders (.ipynb_checkpoints, .git) are never classes or data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root))
    return sorted(found, key=lambda p: p.parts)


def _read_image(path: Path, channels: int | None, resolution: int | None) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (greyscale) or ``[H, W, 3]`` (RGB), converted and resized as asked.

    With ``channels=None`` the image keeps its own kind: greyscale modes give ``[H, W]``, the rest RGB.
    """
    check_regular_file(path, "image file")
    with Image.open(path) as im:
        im.load()
        # Phone JPEGs store their rotation in EXIF; apply it so the pixels are upright.
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):
            # 16-bit greyscale PNG; PIL's own conversion to "L" would clip at 255 instead of rescaling.
            grey = np.asarray(im, dtype=np.float64) / 257.0
            im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
        if channels is None:
            channels = 1 if im.mode in _GREY_MODES else 3
        im = im.convert("L" if channels == 1 else "RGB")  # drops any alpha band
        if resolution is not None and im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


class ImageFolderDataset(_PreloadedImages):
    """PNG/JPEG images (``.png``, ``.jpg``, ``.jpeg``, any case) found recursively under ``root``.

    Labels: if the images lie in the immediate subdirectories of ``root`` (at any depth below them), each such
    subdirectory is a class, numbered in sorted name order (``.classes``). If they lie directly in ``root``,
    every label is -1 and ``num_classes`` is 0. Having both is an error. Hidden files and folders (a leading
    ``.``) are ignored; symlinked folders are followed.

    Args:
        root: the folder.
        resolution: resize every image to ``resolution x resolution`` (PIL bicubic; the aspect ratio is not
            kept). If None, all images must already have one size.
        channels: 1 (greyscale, PIL ``"L"``) or 3 (``"RGB"``); alpha is dropped. If None: 3 if any image is
            in colour, else 1, so a greyscale picture among colour ones does not turn the whole set grey.
        on_error: what an unreadable or corrupt file does: ``"raise"`` a ``ValueError`` naming it, or
            ``"skip"`` it, listing it in ``.skipped`` and giving one warning with the count.

    Images are float32 ``[C, H, W]`` in ``[-1, 1]`` (uint8 0 -> -1, 255 -> 1). ``.files`` holds the paths of
    the loaded images, in the order of ``.images``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | None = None,
        channels: int | None = None,
        on_error: str = "raise",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if channels not in (None, 1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 (greyscale), 3 (RGB) or None (inferred), got {channels!r}")
        if resolution is not None and (
            not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1
        ):
            raise ValueError(f"resolution must be a positive integer or None, got {resolution!r}")
        root = Path(root)
        if not os.path.lexists(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        if not root.is_dir():
            what = "a symlink loop or a dangling link" if not root.exists() else "not a folder"
            raise NotADirectoryError(f"expected a folder of images, but {root} is {what}")
        rel = _find_images(root)
        if not rel:
            raise ValueError(f"no images found under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")

        flat = [p for p in rel if len(p.parts) == 1]
        nested = [p for p in rel if len(p.parts) > 1]
        if flat and nested:
            raise ValueError(
                f"{root} holds images both directly ({flat[0]}) and in subfolders ({nested[0]}); put all images "
                "in class subfolders, or all directly in the folder for an unlabelled set"
            )
        self.classes: list[str] = sorted({p.parts[0] for p in nested})
        class_index = {name: i for i, name in enumerate(self.classes)}

        arrays, labels, files = [], [], []
        self.skipped: list[Path] = []
        first_size: tuple[Path, tuple[int, int]] | None = None
        for r in rel:
            path = root / r
            try:
                a = _read_image(path, channels, resolution)
            except Exception as exc:  # PIL signals corrupt data with many exception types
                if on_error == "raise":
                    raise ValueError(
                        f"cannot read image {path}: {exc} (pass on_error='skip' to leave unreadable files out)"
                    ) from exc
                self.skipped.append(path)
                continue
            size = a.shape[:2]
            if first_size is None:
                first_size = (path, size)
            elif size != first_size[1]:
                (p0, s0) = first_size
                raise ValueError(
                    f"images differ in size: {p0} is {s0[1]}x{s0[0]} but {path} is {size[1]}x{size[0]} (WxH); "
                    "pass resolution= to resize them all to one square size"
                )
            arrays.append(a)
            labels.append(class_index[r.parts[0]] if nested else -1)
            files.append(path)
        if not arrays:
            raise ValueError(
                f"none of the {len(rel)} image files under {root} could be read (first: {self.skipped[0]})"
            )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image file(s) of {len(rel)} under {root} "
                f"(first: {self.skipped[0]}); the list is in .skipped",
                stacklevel=2,
            )

        if channels is None:
            channels = 3 if any(a.ndim == 3 for a in arrays) else 1
        if channels == 3:
            # L -> RGB in PIL copies the grey value into R, G and B, so repeating it here is the same conversion.
            arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        x = torch.from_numpy(np.stack(arrays))
        x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
        self.root = root
        self.files = files
        self._set(_uint8_to_unit(x), torch.tensor(labels, dtype=torch.int64), num_classes=len(self.classes))


# --------------------------------------------------------------------------------------------------------------
# .npy / .npz arrays


def _array_layout(shape: tuple[int, ...], path: Path) -> str:
    """``"NHW"``, ``"NCHW"`` or ``"NHWC"`` for an image array of ``shape``; see :class:`ArrayDataset`."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[1] in (1, 3, 4):
            return "NCHW"
        if shape[3] in (1, 3, 4):
            return "NHWC"
    raise ValueError(
        f"{path}: images of shape {shape} are not [N, H, W], [N, C, H, W] or [N, H, W, C] with C in 1, 3, 4"
    )


# What NumPy's header parser and zipfile raise for a damaged file (zipfile: zlib.error for bad deflate data,
# NotImplementedError for an unknown compression method, RuntimeError for a member flagged as encrypted, EOFError
# for a member shorter than its directory entry says, struct.error for short headers).
_DAMAGE = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, struct.error,
           OverflowError)  # fmt: skip
# deflate cannot expand data more than 1032-fold; a member that claims more is damaged (or a zip bomb)
_DEFLATE_MAX_RATIO = 1032


def _np_read(path: Path, read):
    """``read()``, with NumPy's and zipfile's errors for a bad file turned into one ``ValueError`` naming ``path``."""
    try:
        return read()
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"cannot read {path} as a NumPy file: {exc}") from exc
    except _DAMAGE as exc:  # truncated, damaged, or not a NumPy file at all
        raise ValueError(f"cannot read {path} as a NumPy file: {type(exc).__name__}: {exc}") from exc


def _read_npy(f, size: int, path: Path, key: str | None = None) -> np.ndarray:
    """One array from the ``.npy`` stream ``f`` of ``size`` bytes: the file ``path``, or its member ``key``.

    NumPy's own loader trusts the header: a damaged shape there either asks for terabytes or silently drops the
    images past it. Here the header must describe exactly the bytes that follow it, and object arrays (which
    would need unpickling) are refused before any data is read.
    """
    where = str(path) if key is None else f"{path} (array {key!r})"
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read_header(f)
    except Exception as exc:  # the header is Python literal text: its parser fails in many ways on damaged text
        raise ValueError(f"{where}: unreadable .npy header ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise ValueError(
            f"{path} holds an object array{'' if key is None else f' ({key!r})'}, which would need unpickling; "
            "files are never unpickled, for safety. Save plain numeric arrays (uint8 or float) instead"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    have = size - f.tell()
    if nbytes != have:
        raise ValueError(
            f"{where}: its header describes {nbytes} bytes of data (shape {shape}, dtype {dtype}) but the file holds "
            f"{have}: corrupt or truncated"
        )
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{where} is truncated: {got} of {nbytes} bytes of data")
        got += n
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_npz(path: Path) -> dict[str, zipfile.ZipInfo]:
    """The arrays of an ``.npz`` by key (member name without ``.npy``), after every member passed zipfile's CRC and
    header checks: a damaged name (``labels`` read as ``lafels``) must not make an array silently vanish."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        for info in infos:
            if (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size) or (
                info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 2**20
            ):
                raise ValueError(f"{path} is corrupt: member {info.filename!r} claims {info.file_size} bytes from "
                                 f"{info.compress_size} stored")  # fmt: skip
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"{path} is corrupt: member {bad!r} fails its CRC or header check")
    declared = _zip_entries_declared(path)
    if declared is not None and declared != len(infos):
        # a damaged length field in one directory entry can swallow the entries after it without an error
        raise ValueError(f"{path} is corrupt: its directory declares {declared} members but lists {len(infos)}")
    keys = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in infos}
    if len(keys) != len(infos):
        raise ValueError(f"{path} is corrupt: two members share a name")
    return keys


def _zip_entries_declared(path: Path) -> int | None:
    """The member count in the zip's end-of-central-directory record (None for zip64, which keeps it elsewhere)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 22 - 0xFFFF))  # the record is 22 bytes plus a comment of at most 64 KiB
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    total = int.from_bytes(tail[at + 10 : at + 12], "little")
    return None if total == 0xFFFF else total


def _npz_array(path: Path, members: dict[str, zipfile.ZipInfo], key: str) -> np.ndarray:
    info = members[key]
    if not info.filename.endswith(".npy"):
        raise ValueError(f"{path}: member {info.filename!r} is not a .npy array")
    with zipfile.ZipFile(path) as z, z.open(info) as f:
        return _read_npy(f, info.file_size, path, key)


class ArrayDataset(_PreloadedImages):
    """Images from a ``.npy`` file (images only) or a ``.npz`` file (images, optionally labels).

    Read with NumPy's header parser but not ``np.load``: a file is never unpickled (object arrays are refused), its
    header must describe exactly the data that follows (a damaged shape neither drops images silently nor asks for
    terabytes), and every member of an ``.npz`` must pass its CRC-32 check. A ``.npy`` file has no checksum, so a
    damaged pixel loads as it is. Anything wrong with the file raises ``ValueError`` naming it.

    Args:
        path: the ``.npy`` or ``.npz`` file.
        key: the images' array in a ``.npz``. Default: ``"images"`` if present, else ``"x"``, else the only array
            other than the labels.
        labels_key: the labels' array in a ``.npz`` (1-D integers, one per image, -1 meaning no label). The
            default ``"labels"`` is optional; any other name must exist. None: no labels.

    Layouts: ``[N, H, W]`` (greyscale), ``[N, C, H, W]`` or ``[N, H, W, C]`` with ``C`` in 1, 3, 4. A 4-D
    array is channels-first whenever its second dim is 1, 3 or 4, and channels-last when only its last one is;
    channels are kept as stored (4 stays 4). Values: uint8 maps ``[0, 255]`` to ``[-1, 1]``; float arrays must
    already be in ``[-1, 1]`` (within 0.01, then clamped). Other dtypes are refused.
    """

    def __init__(self, path: str | os.PathLike, key: str | None = None, labels_key: str | None = "labels"):
        path = Path(path)
        size = check_regular_file(path, "array file")
        suffix = path.suffix.lower()
        if suffix not in ARRAY_EXTENSIONS:
            raise ValueError(
                f"{path}: an array dataset must be a .npy or .npz file, got {path.suffix or 'no suffix'!r}"
            )

        labels = None
        if suffix == ".npy":
            if key is not None:
                raise ValueError(f"{path}: key= names an array in a .npz file; a .npy file holds just one")

            def read_one():
                with open(path, "rb") as f:
                    return _read_npy(f, size, path)

            images = _np_read(path, read_one)
        else:
            members = _np_read(path, lambda: _read_npz(path))
            names = list(members)
            key = self._images_key(names, key, labels_key, path)
            images = _np_read(path, lambda: _npz_array(path, members, key))
            if labels_key is not None and labels_key != key:
                if labels_key in members:
                    labels = _np_read(path, lambda: _npz_array(path, members, labels_key))
                elif labels_key != "labels":
                    raise ValueError(f"{path} has no labels array {labels_key!r}; its arrays: {names}")

        self.path = path
        self.key = key
        x = self._images_tensor(images, path)
        n = x.shape[0]
        if labels is None:
            y, num_classes = torch.full((n,), -1, dtype=torch.int64), 0
        else:
            y = self._labels_tensor(labels, n, labels_key, path)
            num_classes = int(y.max()) + 1
        self._set(x, y, num_classes)

    @staticmethod
    def _images_key(keys: list[str], key: str | None, labels_key: str | None, path: Path) -> str:
        if key is not None:
            if key not in keys:
                raise ValueError(f"{path} has no array {key!r}; its arrays: {keys}")
            return key
        for name in ("images", "x"):
            if name in keys:
                return name
        others = [k for k in keys if k != labels_key]
        if len(others) == 1:
            return others[0]
        raise ValueError(
            f"{path}: cannot tell which array holds the images (no 'images' or 'x'); its arrays: {keys}. "
            "Pass key= to choose one"
        )

    @staticmethod
    def _images_tensor(a: np.ndarray, path: Path) -> torch.Tensor:
        """float32 ``[N, C, H, W]`` in ``[-1, 1]`` from a checked uint8 or float array."""
        layout = _array_layout(a.shape, path)
        if 0 in a.shape:
            raise ValueError(f"{path}: the image array is empty (shape {a.shape})")
        if a.dtype == np.uint8:
            x = _uint8_to_unit(torch.from_numpy(np.ascontiguousarray(a)))
        elif np.issubdtype(a.dtype, np.floating):
            x = torch.from_numpy(np.asarray(a, dtype=np.float32))
            if not torch.isfinite(x).all():
                raise ValueError(f"{path}: the image array contains NaN or Inf")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1.01 or hi > 1.01:
                raise ValueError(
                    f"{path}: float images must lie in [-1, 1], but their values span [{lo:g}, {hi:g}]; "
                    "scale them (x / 127.5 - 1 for 0..255, 2 * x - 1 for 0..1) or store uint8"
                )
            x = x.clamp(-1.0, 1.0)
        else:
            raise ValueError(f"{path}: images must be uint8 (0..255) or float (in [-1, 1]), got dtype {a.dtype}")
        if layout == "NHW":
            x = x.unsqueeze(1)
        elif layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        return x.contiguous()

    @staticmethod
    def _labels_tensor(a: np.ndarray, n: int, labels_key: str, path: Path) -> torch.Tensor:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path}: labels {labels_key!r} must be integers, got dtype {a.dtype}")
        if a.ndim != 1 or a.shape[0] != n:
            raise ValueError(f"{path}: labels {labels_key!r} have shape {a.shape}, but there are {n} images")
        if (a < -1).any():
            raise ValueError(f"{path}: labels must be class indices >= 0 (or -1 for none), got min {a.min()}")
        return torch.from_numpy(a.astype(np.int64))


# --------------------------------------------------------------------------------------------------------------
# Dispatch and output

_ACCEPTED_SPECS = "'digits', a folder of PNG/JPEG images, or a .npy/.npz file"


def get_dataset(spec: str, resolution: int | None = None, **kwargs) -> Dataset:
    """A dataset from a command-line string.

    - ``"digits"``: :class:`DigitsDataset` at ``resolution`` (16 if None); ``kwargs`` may give ``split``.
    - a folder: :class:`ImageFolderDataset` (``kwargs``: ``channels``, ``on_error``).
    - a ``.npy``/``.npz`` file: :class:`ArrayDataset` (``kwargs``: ``key``, ``labels_key``). Arrays are not
      resampled: a ``resolution`` other than the array's own size is an error.

    A path that does not exist raises ``FileNotFoundError``; any other spec ``ValueError``.
    """
    if spec == "digits":
        return DigitsDataset(resolution=16 if resolution is None else resolution, **kwargs)
    path = Path(spec)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no dataset {spec!r}: no such file or folder (accepted: {_ACCEPTED_SPECS})")
    if path.is_dir():
        return ImageFolderDataset(path, resolution=resolution, **kwargs)
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        ds = ArrayDataset(path, **kwargs)
        if resolution is not None and ds.shape[1:] != (resolution, resolution):
            raise ValueError(
                f"{path} holds {ds.shape[1]}x{ds.shape[2]} images but resolution={resolution} was asked; arrays "
                "are not resampled, so resize the array or leave resolution unset"
            )
        return ds
    raise ValueError(f"cannot load dataset {spec!r}: accepted are {_ACCEPTED_SPECS}")


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> np.ndarray:
    """``images`` tiled into one uint8 picture, ``[H, W]`` for 1 channel, else ``[H, W, C]``; the layout of
    :func:`save_image_grid`, which documents the arguments."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must be [N, C, H, W] with N >= 1 and C in 1, 3, 4, got {tuple(images.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    n, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf; cannot write them as a picture")
    tiles = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 1) - 1, cols * (w + 1) - 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = tiles[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).contiguous().numpy()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """Write ``images`` as one PNG grid and return its path.

    Args:
        images: ``[N, C, H, W]`` with ``C`` 1 (greyscale), 3 (RGB) or 4 (RGBA), values in ``[-1, 1]`` (clamped;
            -1 -> 0, 1 -> 255, rounded), any float dtype and device.
        path: the ``.png`` file; its folder is created if missing. The write is atomic: a temporary file in the
            same folder, then a rename, so a reader never sees half a PNG.
        nrow: images per row; default ``ceil(sqrt(N))``, a near-square grid.
        scale: each image is enlarged ``scale`` times by nearest-neighbour (pixels stay sharp), before tiling.

    Tiles are separated by 1 white pixel (no outer border): white, so that dark-background samples such as
    digits stay apart. The grid is ``cols * (scale * W) + cols - 1`` pixels wide, ``cols = min(nrow, N)``.
    """
    arr = image_grid(images, nrow, scale)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_image_grid writes PNG; give a path ending in .png, got {path}")
    picture = Image.fromarray(arr)  # uint8 [H, W] -> "L", [H, W, 3] -> "RGB", [H, W, 4] -> "RGBA"

    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path
