"""Datasets: a miniature CUB-200-2011 tree, an ImageFolder tree and Fashion-MNIST IDX files, all written here."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phpn_core.data.base import IMAGENET_MEAN, IMAGENET_STD
from phpn_core.data.cub import CUB200
from phpn_core.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, read_idx
from phpn_core.data.imagefolder import ImageFolderDataset
from phpn_core.data.images import ImageLoadError, find_unreadable, load_image, open_rgb
from phpn_core.errors import InputValueError

# ----------------------------------------------------------------------------- miniature CUB fixture

CLASSES = ["001.Alpha_bird", "002.Beta_bird", "003.Gamma_bird"]
PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
         "right eye", "right leg", "right wing", "tail", "throat"]
# id: (class 1-based, is_train, (W, H), kind)
IMAGES = {
    1: (1, 1, (40, 30), "jpeg"),
    2: (1, 1, (50, 60), "gray"),
    3: (1, 0, (45, 35), "jpeg"),
    4: (2, 1, (64, 48), "rgba"),
    5: (2, 1, (30, 40), "palette"),
    6: (2, 0, (40, 40), "jpeg"),
    7: (3, 1, (36, 52), "jpeg"),
    8: (3, 0, (48, 32), "jpeg"),
    9: (3, 0, (33, 44), "jpeg"),
}
INVISIBLE_PARTS = {4, 9, 13}  # 1-based part ids that are invisible on every image (besides image 1's own rows)
# Image 1: hand-placed keypoints around its box x=5, y=4, w=20, h=15 -> half-open crop [5, 25) x [4, 19).
IMG1_PARTS = {
    1: (10.0, 8.0, 1),   # inside
    2: (5.0, 4.0, 1),    # on the box's top-left corner: inside
    3: (3.0, 8.0, 1),    # left of the box: out of crop
    5: (25.0, 8.0, 1),   # on the right edge x = x0 + w: outside (half-open)
    6: (24.5, 18.5, 1),  # just inside the bottom-right
    7: (12.0, 20.0, 1),  # below the box
}
BOXES = {1: "5.0 4.0 20.0 15.0", 3: "5.7 4.2 20.9 15.5"}  # others: 2 3 W-6 H-7


def rel_path(i: int) -> str:
    cls = CLASSES[IMAGES[i][0] - 1]
    ext = "png" if IMAGES[i][3] in ("rgba", "palette") else "jpg"
    return f"{cls}/{cls.split('.')[1]}_{i:04d}.{ext}"


def part_loc(i: int, p: int) -> tuple[float, float, int]:
    W, H = IMAGES[i][2]
    if i == 1:
        return IMG1_PARTS.get(p, (0.0, 0.0, 0))
    if p in INVISIBLE_PARTS:
        return 0.0, 0.0, 0
    return float(1 + (2 * p + i) % (W - 2)), float(1 + (3 * p + i) % (H - 2)), 1


def make_cub(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "parts").mkdir(parents=True)
    for cls in CLASSES:
        (root / "images" / cls).mkdir(parents=True)
    for i, (_, _, (W, H), kind) in IMAGES.items():
        path = root / "images" / rel_path(i)
        if kind == "jpeg":
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, quality=90)
        elif kind == "gray":
            Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8), mode="L").save(path, quality=90)
        elif kind == "rgba":
            Image.new("RGBA", (W, H), (200, 100, 50, 128)).save(path)
        elif kind == "palette":
            im = Image.new("P", (W, H), 1)
            im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
            im.save(path)
    w = lambda name, lines: (root / name).write_text("\n".join(lines) + "\n")  # noqa: E731
    w("images.txt", [f"{i} {rel_path(i)}" for i in IMAGES])
    w("image_class_labels.txt", [f"{i} {c}" for i, (c, *_) in IMAGES.items()])
    w("train_test_split.txt", [f"{i} {t}" for i, (_, t, *_) in IMAGES.items()])
    w("classes.txt", [f"{k + 1} {c}" for k, c in enumerate(CLASSES)])
    w("bounding_boxes.txt", [f"{i} {BOXES.get(i, f'2.0 3.0 {W - 6}.0 {H - 7}.0')}"
                             for i, (_, _, (W, H), _) in IMAGES.items()])
    w("parts/parts.txt", [f"{k + 1} {p}" for k, p in enumerate(PARTS)])
    w("parts/part_locs.txt", [f"{i} {p} {x:.1f} {y:.1f} {v}"
                              for i in IMAGES for p in range(1, 16) for x, y, v in [part_loc(i, p)]])
    return root


@pytest.fixture
def cub(tmp_path) -> Path:
    return make_cub(tmp_path / "CUB_200_2011")


def assert_close(got, want, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """torch.testing.assert_close without its ~3 s first-call import cost."""
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, atol=atol, rtol=rtol), (got, want)


def item_of(ds, cub_id: int):
    return ds[ds.cub_ids.index(cub_id)]


# ----------------------------------------------------------------------------- CUB

def test_cub_labels_split_and_attributes(cub):
    tr, te = CUB200(cub, split="train", image_size=32), CUB200(cub, split="test", image_size=32)
    assert len(tr) == 5 and len(te) == 4
    assert tr.cub_ids == [1, 2, 4, 5, 7] and te.cub_ids == [3, 6, 8, 9]
    assert tr.labels == [0, 0, 1, 1, 2] and te.labels == [0, 1, 2, 2]
    assert tr.classes == CLASSES and tr.part_names == PARTS and tr.part_names[6] == "left eye"
    assert tr.mean == IMAGENET_MEAN and tr.std == IMAGENET_STD
    s = tr[0]
    assert set(s) == {"image", "label", "image_id", "keypoints"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 32, 32)
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["label"] == 0 and s["image_id"] == rel_path(1)
    assert s["keypoints"].dtype == torch.float32 and s["keypoints"].shape == (15, 3)
    assert [tr[k]["label"] for k in range(len(tr))] == tr.labels
    assert tr[-1]["image_id"] == rel_path(7)
    with pytest.raises(IndexError):
        tr[5]


def test_cub_resize_scales_keypoints(cub):
    S = 32
    ds = CUB200(cub, split="train", image_size=S)
    for cid in (2, 4, 7):
        W, H = IMAGES[cid][2]
        kp = item_of(ds, cid)["keypoints"]
        for p in range(1, 16):
            x, y, v = part_loc(cid, p)
            if v:
                assert_close(kp[p - 1], torch.tensor([x * S / W, y * S / H, 1.0]))
            else:
                assert kp[p - 1].tolist() == [0.0, 0.0, 0.0]


def test_cub_crop_to_bbox_keypoints_exact(cub):
    S = 20
    ds = CUB200(cub, split="train", image_size=S, crop_to_bbox=True)
    kp = item_of(ds, 1)["keypoints"]
    # Box 5 4 20 15 -> [5, 25) x [4, 19): x' = (x - 5) * 20 / 20, y' = (y - 4) * 20 / 15.
    expected = {1: (5.0, 16 / 3, 1.0),            # (10, 8)
                2: (0.0, 0.0, 1.0),               # (5, 4): the corner, inside
                3: (0.0, 0.0, 0.0),               # (3, 8): left of the box
                5: (0.0, 0.0, 0.0),               # (25, 8): on the excluded right edge
                6: (19.5, 29 / 2 * 20 / 15, 1.0),  # (24.5, 18.5)
                7: (0.0, 0.0, 0.0)}               # (12, 20): below
    for p in range(1, 16):
        want = expected.get(p, (0.0, 0.0, 0.0))
        assert_close(kp[p - 1], torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-5)

    # Fractional box 5.7 4.2 20.9 15.5 -> floor: x0=5, y0=4, x1=5+20=25, y1=4+15=19 (ProtoEval's ints).
    te = CUB200(cub, split="test", image_size=S, crop_to_bbox=True)
    kp3 = item_of(te, 3)["keypoints"]
    for p in range(1, 16):
        x, y, v = part_loc(3, p)
        if v and 5 <= x < 25 and 4 <= y < 19:
            assert_close(kp3[p - 1], torch.tensor([(x - 5) * S / 20, (y - 4) * S / 15, 1.0]))
        else:
            assert kp3[p - 1].tolist() == [0.0, 0.0, 0.0], (p, x, y, v)
    assert (kp3[:, 2] == 0).sum() > len(INVISIBLE_PARTS)  # some visible parts fell out of the crop


def test_cub_crop_pixels_are_the_box(cub):
    # The crop must take exactly the box's pixels [5, 25) x [4, 19): compare with cropping + resizing by hand.
    ds = CUB200(cub, split="train", image_size=20, crop_to_bbox=True)
    img = item_of(ds, 1)["image"]
    with Image.open(cub / "images" / rel_path(1)) as im:
        ref = im.convert("RGB").crop((5, 4, 25, 19)).resize((20, 20), Image.Resampling.BILINEAR)
    ref_t = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    assert_close(img, ref_t)


def test_cub_modes_come_out_rgb(cub):
    ds = CUB200(cub, split="train", image_size=16)
    gray = item_of(ds, 2)["image"]
    assert gray.shape == (3, 16, 16)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = item_of(ds, 4)["image"]  # alpha dropped, colour kept
    assert rgba.shape == (3, 16, 16)
    assert_close(rgba, torch.tensor([200, 100, 50]).view(3, 1, 1).expand(3, 16, 16) / 255.0)
    pal = item_of(ds, 5)["image"]
    assert pal.shape == (3, 16, 16)
    with Image.open(cub / "images" / rel_path(5)) as im:
        assert im.mode == "P"
    assert_close(pal, torch.tensor([10, 20, 30]).view(3, 1, 1).expand(3, 16, 16) / 255.0)


def test_cub_class_subset_relabels(cub):
    ds = CUB200(cub, split="train", image_size=8, classes=[2, 0])
    assert ds.classes == [CLASSES[2], CLASSES[0]] and ds.class_ids == [2, 0]
    assert ds.cub_ids == [1, 2, 7] and ds.labels == [1, 1, 0]
    assert item_of(ds, 7)["label"] == 0
    for bad in ([3], [0, 0], [], [-1], "0", [True]):
        with pytest.raises(InputValueError, match="classes"):
            CUB200(cub, classes=bad)


def test_cub_missing_and_malformed_metadata(cub):
    (cub / "parts" / "part_locs.txt").unlink()
    with pytest.raises(InputValueError, match=r"parts/part_locs\.txt.*CUB-200-2011 layout needs"):
        CUB200(cub)
    make_cub(cub.parent / "b")
    b = cub.parent / "b"
    (b / "bounding_boxes.txt").unlink()
    assert len(CUB200(b)) == 5  # boxes are only needed for cropping
    with pytest.raises(InputValueError, match="bounding_boxes.txt"):
        CUB200(b, crop_to_bbox=True)
    lines = (b / "image_class_labels.txt").read_text().splitlines()
    lines[2] = "3 two"
    (b / "image_class_labels.txt").write_text("\n".join(lines))
    with pytest.raises(InputValueError, match=r"image_class_labels\.txt:3"):
        CUB200(b)
    with pytest.raises(InputValueError, match="not a directory"):
        CUB200(cub.parent / "nowhere")
    with pytest.raises(InputValueError, match="split"):
        CUB200(cub.parent / "b", split="val")


def test_cub_corrupt_image_raise_and_skip(cub):
    path = cub / "images" / rel_path(7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated JPEG
    ds = CUB200(cub, split="train", image_size=16)
    assert len(ds) == 5
    with pytest.raises(ImageLoadError, match=rel_path(7).split("/")[1]) as ei:
        item_of(ds, 7)
    assert ei.value.path == str(path) and isinstance(ei.value, InputValueError)
    sk = CUB200(cub, split="train", image_size=16, on_error="skip")
    assert sk.cub_ids == [1, 2, 4, 5] and sk.labels == [0, 0, 1, 1] and len(sk) == 4
    assert sk.skipped == [str(path)] and str(path) in sk.skip_reasons
    assert [sk[k]["image_id"] for k in range(4)] == [rel_path(i) for i in (1, 2, 4, 5)]
    assert item_of(sk, 5)["keypoints"].shape == (15, 3)
    with pytest.raises(InputValueError, match="on_error"):
        CUB200(cub, on_error="ignore")


def test_cub_over_limit_image_refused(cub):
    with pytest.raises(ImageLoadError, match="over the limit of 1000 pixels"):
        CUB200(cub, split="train", max_pixels=1000)[0]  # 40x30 = 1200 px
    sk = CUB200(cub, split="train", max_pixels=1500, on_error="skip")  # 40x30 and 30x40 fit
    assert sk.cub_ids == [1, 5]


def test_cub_collates_and_pickles(cub):
    ds = CUB200(cub, split="train", image_size=16, crop_to_bbox=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["keypoints"].shape == (5, 15, 3)
    assert batch["label"].tolist() == ds.labels
    ds2 = pickle.loads(pickle.dumps(ds))
    assert_close(ds2[0]["keypoints"], ds[0]["keypoints"])
    a, b = ds[0], ds[0]
    a["keypoints"].add_(1)
    a["image"].add_(1)
    assert not torch.equal(a["keypoints"], ds[0]["keypoints"])  # items are fresh tensors


# ----------------------------------------------------------------------------- image helper

def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h (1-bit gray) but carries no pixel data: enough to trip size checks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bombs_refused(tmp_path):
    big = tmp_path / "big.png"  # 1e8 px: over our default limit, under PIL's hard error (only a PIL warning)
    _png_header_only(big, 10_000, 10_000)
    with pytest.raises(ImageLoadError, match="big.png.*over the limit"):
        open_rgb(big)
    huge = tmp_path / "huge.png"  # 4e8 px: PIL's own DecompressionBombError, reported with the file name
    _png_header_only(huge, 20_000, 20_000)
    with pytest.raises(ImageLoadError, match="huge.png.*decompression bomb"):
        open_rgb(huge)
    assert set(find_unreadable([big, huge])) == {0, 1}


def test_image_helper_modes_and_errors(tmp_path):
    a = np.zeros((8, 8), dtype=np.uint16)
    a[:, 4:] = 65535
    Image.fromarray(a).save(tmp_path / "deep.png")  # 16-bit gray: must not clip to white
    img, size = load_image(tmp_path / "deep.png", image_size=None)
    assert size == (8, 8) and img.shape == (3, 8, 8)
    assert img[:, :, :4].max() == 0.0 and img[:, :, 4:].min() == 1.0
    Image.new("LA", (6, 4), (77, 10)).save(tmp_path / "la.png")
    img, _ = load_image(tmp_path / "la.png", image_size=5)
    assert img.shape == (3, 5, 5) and torch.allclose(img, torch.full((3, 5, 5), 77 / 255))
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match="text.jpg"):
        open_rgb(tmp_path / "text.jpg")
    with pytest.raises(ImageLoadError, match="does not exist"):
        open_rgb(tmp_path / "missing.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad_crc.png").write_bytes(raw[:40] + bytes([raw[40] ^ 0xFF]) + raw[41:])  # corrupt a chunk
    with pytest.raises(ImageLoadError, match="bad_crc.png"):
        open_rgb(tmp_path / "bad_crc.png")


# ----------------------------------------------------------------------------- ImageFolder

def make_tree(root: Path) -> Path:
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    (root / "bird").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "cat" / "b.png")
    Image.new("L", (12, 12), 128).save(root / "cat" / "sub" / "a.jpg")
    Image.new("RGBA", (9, 7), (0, 0, 255, 0)).save(root / "dog" / "c.PNG")
    Image.new("RGB", (30, 30), (0, 255, 0)).save(root / "dog" / "a.jpeg")
    Image.new("RGB", (5, 5)).save(root / "bird" / "z.bmp")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_matches_torchvision(tmp_path):
    import torchvision

    root = make_tree(tmp_path / "tree")
    ds = ImageFolderDataset(root, image_size=16)
    tv = torchvision.datasets.ImageFolder(str(root))
    assert ds.classes == tv.classes == ["bird", "cat", "dog"]
    assert ds.labels == [t for _, t in tv.samples]
    assert ds.image_ids == [Path(p).relative_to(root).as_posix() for p, _ in tv.samples]
    assert ds.image_ids == ["bird/z.bmp", "cat/b.png", "cat/sub/a.jpg", "dog/a.jpeg", "dog/c.PNG"]
    assert ds.part_names is None and ds.mean == IMAGENET_MEAN
    for k in range(len(ds)):
        s = ds[k]
        assert set(s) == {"image", "label", "image_id"} and s["image"].shape == (3, 16, 16)
    assert_close(ds[1]["image"][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert_close(ds[4]["image"][:, 3, 3], torch.tensor([0.0, 0.0, 1.0]))  # RGBA -> RGB
    # bird/ has no png: an error, as in torchvision.
    with pytest.raises(InputValueError, match=r"no image file in class folder\(s\) \['bird'\]"):
        ImageFolderDataset(root, extensions=["png"])


def test_imagefolder_skip_and_errors(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "cat" / "b.png").write_bytes((root / "cat" / "b.png").read_bytes()[:30])
    ds = ImageFolderDataset(root, image_size=8)
    with pytest.raises(ImageLoadError, match="b.png"):
        ds[1]
    sk = ImageFolderDataset(root, image_size=8, on_error="skip")
    assert sk.image_ids == ["bird/z.bmp", "cat/sub/a.jpg", "dog/a.jpeg", "dog/c.PNG"] and sk.labels == [0, 1, 2, 2]
    assert sk.skipped == [str(root / "cat" / "b.png")]
    with pytest.raises(InputValueError, match="no class subfolder"):
        ImageFolderDataset(tmp_path / "tree" / "bird")
    with pytest.raises(InputValueError, match="image_size"):
        ImageFolderDataset(root, image_size=0)


# ----------------------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, arr: np.ndarray, *, magic: int | None = None, gz: bool = True) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">I", magic if magic is not None else (0x08 << 8) | arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_fmnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array([3, 0, 3, 9, 1, 3, 0, 2], dtype=np.uint8)
    images = (np.arange(len(labels) * 28 * 28).reshape(len(labels), 28, 28) * 7 % 256).astype(np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    write_idx(root / "t10k-images-idx3-ubyte", images[:3], gz=False)  # uncompressed files are accepted too
    write_idx(root / "t10k-labels-idx1-ubyte", labels[:3], gz=False)
    return images, labels


def test_fashion_mnist_reads_exact_values(tmp_path):
    images, labels = make_fmnist(tmp_path / "fm")
    ds = FashionMNIST(tmp_path / "fm", split="train")
    assert len(ds) == 8 and ds.labels == labels.tolist() and ds.classes == FASHION_MNIST_CLASSES
    assert ds.part_names is None and len(ds.mean) == 3 and len(ds.std) == 3
    for k in (0, 5, 7):
        s = ds[k]
        assert set(s) == {"image", "label", "image_id"} and s["image"].dtype == torch.float32
        want = torch.from_numpy(images[k].astype(np.float32) / 255.0)
        assert s["image"].shape == (3, 28, 28)
        for c in range(3):
            assert torch.equal(s["image"][c], want)
        assert s["label"] == int(labels[k]) and s["image_id"] == f"train/{k:05d}"
    te = FashionMNIST(tmp_path / "fm", split="test")
    assert te.labels == [3, 0, 3] and torch.equal(te[2]["image"][0], torch.from_numpy(images[2] / 255.0).float())
    lim = FashionMNIST(tmp_path / "fm", limit_per_class=1)
    assert lim.image_ids == ["train/00000", "train/00001", "train/00003", "train/00004", "train/00007"]
    assert lim.labels == [3, 0, 9, 1, 2]
    big = FashionMNIST(tmp_path / "fm", image_size=56)[0]["image"]
    assert big.shape == (3, 56, 56) and 0.0 <= big.min() and big.max() <= 1.0


def test_fashion_mnist_bad_files(tmp_path):
    images, labels = make_fmnist(tmp_path / "fm")
    root = tmp_path / "fm"
    write_idx(root / "train-labels-idx1-ubyte.gz", labels, magic=0x00000803)  # images' magic on labels
    with pytest.raises(InputValueError, match=r"train-labels-idx1-ubyte\.gz.*magic number 0x00000803.*0x00000801"):
        FashionMNIST(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:5])
    with pytest.raises(InputValueError, match="8 images but .* 5 labels"):
        FashionMNIST(root)
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(InputValueError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        read_idx(root / "train-images-idx3-ubyte.gz", ndim=3)
    (root / "train-images-idx3-ubyte.gz").write_bytes(raw)  # not gzipped despite the name
    with pytest.raises(InputValueError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        read_idx(root / "train-images-idx3-ubyte.gz", ndim=3)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(InputValueError, match=r"t10k-labels-idx1-ubyte\.gz.*not found"):
        FashionMNIST(root, split="test")
    with pytest.raises(InputValueError, match="limit_per_class"):
        FashionMNIST(root, limit_per_class=0)


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    ds = FashionMNIST(split="test", limit_per_class=3)
    assert len(ds) == 30 and sorted(set(ds.labels)) == list(range(10))
    s = ds[0]
    assert s["image"].shape == (3, 28, 28) and 0.0 <= s["image"].min() and s["image"].max() <= 1.0


def test_normalize_in_place_gives_the_same_values_in_the_same_tensor():
    from phpn_core.data.base import normalize

    x = torch.rand(2, 3, 5, 5)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    want = normalize(x, mean, std)
    y = x.clone()
    got = normalize(y, mean, std, inplace=True)
    assert got is y and torch.equal(got, want)
    assert not torch.equal(normalize(x, mean, std), x)  # the default leaves its input alone
    ints = torch.randint(0, 2, (1, 3, 2, 2))
    before = ints.clone()
    normalize(ints, mean, std, inplace=True)
    assert torch.equal(ints, before)  # integer images cannot hold the result: never modified
