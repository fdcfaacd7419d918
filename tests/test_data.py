"""End-to-end and bad-input checks of wat_nb.data: every paper dataset on tiny fake copies of its official
layout, the ADM transform, user folders, and every mini dataset built from scratch with the network off."""
import gzip
import json
import socket

import matplotlib
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

matplotlib.use("Agg")

from wat_nb import data as D  # noqa: E402

PAPER = ("food", "sun", "caltech", "cub", "cars", "df20m", "artbench")


def fake_image(path, seed=0, mode="RGB", ext=None):
    "Write a 40x30 random image (JPEG or PNG by suffix)."
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    if mode != "RGB": im = im.convert(mode)
    im.save(path)
    return path


# ---------------------------------------------------------------- fake copies of the official layouts
def make_food(base):
    d = base / "food-101"
    meta = {"train": {}, "test": {}}
    for c in ("apple_pie", "sushi"):
        for i in range(5):
            fake_image(d / "images" / c / f"{i}.jpg", seed=i)
            meta["train" if i < 3 else "test"].setdefault(c, []).append(f"{c}/{i}")
    (d / "meta").mkdir(parents=True)
    for s in meta: (d / "meta" / f"{s}.json").write_text(json.dumps(meta[s]))
    return dict(classes=["apple_pie", "sushi"], n_train=6, n_test=4)


def make_sun(base, partitions=False):
    d = base / "SUN397"
    d.mkdir(parents=True)
    (d / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    lines = {"train": [], "test": []}
    for c in ("a/abbey", "b/beach"):
        for i in range(5):
            fake_image(d / c / f"sun_{c[-3:]}{i}.jpg", seed=i)
            lines["train" if i < 2 else "test"].append(f"/{c}/sun_{c[-3:]}{i}.jpg")
    if partitions:
        (d / "Training_01.txt").write_text("\n".join(lines["train"][:2] + lines["train"][2:]) + "\n")
        (d / "Testing_01.txt").write_text("\n".join(lines["test"][:2] + lines["test"][3:5]) + "\n")
    return dict(classes=["abbey", "beach"], n_train=8, n_test=2)


def make_caltech(base):
    d = base / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "accordion", "airplanes"):
        for i in range(1, 6):
            fake_image(d / c / f"image_{i:04d}.jpg", seed=i)
    return dict(classes=["accordion", "airplanes"], n_train=8, n_test=2)


def make_cub(base):
    d = base / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    imgs, labels, split = [], [], []
    k = 0
    for ci, c in enumerate(classes):
        for i in range(4):
            k += 1
            fake_image(d / "images" / c / f"bird_{i}.jpg", seed=k)
            imgs.append(f"{k} {c}/bird_{i}.jpg"); labels.append(f"{k} {ci + 1}"); split.append(f"{k} {int(i < 3)}")
    (d / "images.txt").write_text("\n".join(imgs) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (d / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    return dict(classes=["Black_footed_Albatross", "Laysan_Albatross"], n_train=6, n_test=2)


def make_cars(base):
    d = base / "stanford_cars"
    ann = {"train": [], "test": []}
    for s, folder in (("train", "cars_train"), ("test", "cars_test")):
        for i in range(4):
            name = f"{i:05d}.jpg"
            fake_image(d / folder / name, seed=i)
            ann[s].append((name, i % 2 + 1))
    dt = [("fname", "O"), ("class", "O")]
    (d / "devkit").mkdir(parents=True)
    scipy.io.savemat(d / "devkit" / "cars_train_annos.mat", {"annotations": np.array(ann["train"], dtype=dt)})
    scipy.io.savemat(d / "cars_test_annos_withlabels.mat", {"annotations": np.array(ann["test"], dtype=dt)})
    scipy.io.savemat(d / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer", "Acura RL"], dtype=object)})
    return dict(classes=["AM General Hummer", "Acura RL"], n_train=4, n_test=4)


def make_split_folders(d, classes):
    for s, n in (("train", 3), ("test", 2)):
        for c in classes:
            for i in range(n):
                fake_image(d / s / c / f"{i}.{'png' if i % 2 else 'jpg'}", seed=i)


def make_df20m(base):
    make_split_folders(base, ["Amanita muscaria", "Boletus edulis"])
    return dict(classes=["Amanita muscaria", "Boletus edulis"], n_train=6, n_test=4)


def make_artbench(base):
    make_split_folders(base / "artbench-10-imagefolder-split", ["baroque", "ukiyo_e"])
    return dict(classes=["baroque", "ukiyo_e"], n_train=6, n_test=4)


MAKERS = dict(food=make_food, sun=make_sun, caltech=make_caltech, cub=make_cub, cars=make_cars,
              df20m=make_df20m, artbench=make_artbench)


@pytest.mark.parametrize("name", PAPER)
def test_paper_dataset_on_fake_layout(tmp_path, name):
    want = MAKERS[name](tmp_path / name)
    tr = D.load_dataset(name, "train", root=tmp_path)
    te = D.load_dataset(name, "test", root=tmp_path)
    assert (tr.name, tr.profile, tr.image_size, tr.source_classes) == (name, "paper", 256, None)
    assert tr.classes == want["classes"] and te.classes == want["classes"]
    assert (len(tr), len(te)) == (want["n_train"], want["n_test"])
    assert not set(tr.files) & set(te.files)
    assert set(tr.targets.tolist()) == {0, 1}
    for ds in (tr, te):
        x, y = ds[len(ds) - 1]
        assert x.shape == (3, 256, 256) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05
        assert y == ds.targets[-1] and isinstance(y, int)
    # labels follow the class folders / annotation files, not the file order
    for f, t in zip(tr.files, tr.targets):
        assert want["classes"][t].split()[0].lower()[:5] in str(f).lower() or name == "cars"
    # fixed split: loading again gives the same files
    assert D.load_dataset(name, "test", root=tmp_path).files == te.files
    assert D.profile_of(name) == "paper" and D.DATASETS[name].num_classes >= 10


def test_cars_labels_come_from_annotations(tmp_path):
    make_cars(tmp_path / "cars")
    tr = D.load_dataset("cars", root=tmp_path)
    assert tr.targets.tolist() == [0, 1, 0, 1]
    assert [f.name for f in tr.files] == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]


def test_sun_official_partition_used_when_present(tmp_path):
    make_sun(tmp_path / "sun", partitions=True)
    tr, te = D.load_dataset("sun", root=tmp_path), D.load_dataset("sun", "test", root=tmp_path)
    assert sorted(f.name for f in tr.files) == ["sun_ach0.jpg", "sun_ach1.jpg", "sun_bey0.jpg", "sun_bey1.jpg"]
    assert len(te) == 4 and not set(tr.files) & set(te.files)


def test_adm_crop_and_flip(tmp_path):
    make_df20m(tmp_path / "df20m")
    tr = D.load_dataset("df20m", root=tmp_path)
    te = D.load_dataset("df20m", "test", root=tmp_path)
    assert tr.flip and not te.flip
    torch.manual_seed(0)
    a = tr[0][0]
    outs = [tr[0][0] for _ in range(30)]
    flipped = [torch.equal(o, a.flip(-1)) for o in outs]
    same = [torch.equal(o, a) for o in outs]
    assert all(f or s for f, s in zip(flipped, same)) and 3 < sum(flipped) < 27
    assert all(torch.equal(te[0][0], te[0][0]) for _ in range(5))
    # the crop: a 40x30 image is scaled so the short side is 256, then the centre 256x256 is kept
    ref = np.asarray(D.load_rgb(te.files[0]).resize((341, 256), Image.BICUBIC))[:, 42:298]
    assert torch.equal(te[0][0], D.to_tensor(ref))
    # a large image is first box-halved: 1100x700 -> 550x350 -> 275x175, then bicubic to 402x256
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 1100, 3), dtype=np.uint8))
    assert D.adm_center_crop(big, 128).size == (128, 128) and D.adm_center_crop(big, 256).size == (256, 256)
    assert D.load_dataset("df20m", root=tmp_path, image_size=32)[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", PAPER)
def test_missing_paper_dataset_says_where_and_how(tmp_path, name):
    with pytest.raises(FileNotFoundError) as e:
        D.load_dataset(name, root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / name) in msg and D.DATASETS[name].layout in msg
    assert ("download=True" in msg) == (name not in ("cars", "df20m"))
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_user_folder_with_odd_images(tmp_path):
    d = tmp_path / "pets"
    for c in ("cat", "dog"):
        for i in range(6): fake_image(d / c / f"{i}.jpg", seed=i)
    fake_image(d / "cat" / "gray.png", mode="L")
    fake_image(d / "dog" / "cmyk.jpg", mode="CMYK")
    fake_image(d / "dog" / "rgba.png", mode="RGBA")
    fake_image(d / "dog" / "pal.gif", mode="P")
    (d / "dog" / ".hidden.jpg").write_bytes(b"junk")
    (d / "cat" / "README.txt").write_text("ignored")
    tr, te = D.load_dataset(str(d), image_size=32), D.load_dataset(d, "test", image_size=32)
    assert tr.classes == ["cat", "dog"] and len(tr) + len(te) == 16
    assert len(te) == 2 and sorted(te.targets.tolist()) == [0, 1]  # ~10 %, at least one per class
    assert tr.profile == "mini" and D.load_dataset(d).profile == "paper" and D.load_dataset(d).image_size == 256
    for ds in (tr, te):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and y in (0, 1)
    for n in ("gray.png", "cmyk.jpg", "rgba.png", "pal.gif"):
        assert D.load_rgb(next(d.rglob(n))).mode == "RGB"


def test_user_folder_with_train_test(tmp_path):
    make_split_folders(tmp_path / "mine", ["a", "b", "c"])
    tr, te = D.load_dataset(tmp_path / "mine"), D.load_dataset(tmp_path / "mine", "test")
    assert (len(tr), len(te), tr.classes) == (9, 6, ["a", "b", "c"])
    fake_image(tmp_path / "mine" / "test" / "zebra" / "0.jpg")
    with pytest.raises(ValueError, match="zebra"):
        D.load_dataset(tmp_path / "mine", "test")


def test_user_folder_with_train_only(tmp_path):
    for c in ("x", "y"):
        for i in range(10): fake_image(tmp_path / "only" / "train" / c / f"{i}.png", seed=i)
    tr, te = D.load_dataset(tmp_path / "only"), D.load_dataset(tmp_path / "only", "test")
    assert tr.classes == ["x", "y"] and (len(tr), len(te)) == (18, 2)
    assert not set(tr.files) & set(te.files)


def test_corrupt_image_names_the_file(tmp_path):
    d = tmp_path / "f"
    for c in ("a", "b"): fake_image(d / c / "ok.jpg")
    (d / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cut = fake_image(d / "b" / "cut.jpg")
    cut.write_bytes(cut.read_bytes()[:200])  # truncated JPEG
    ds = D.load_dataset(d, split="train", image_size=16)
    ds_test = D.load_dataset(d, split="test", image_size=16)
    names = [f.name for f in ds.files]
    assert sorted(names + [f.name for f in ds_test.files]) == ["broken.png", "cut.jpg", "ok.jpg", "ok.jpg"]
    for bad in ("broken.png", "cut.jpg"):
        where = ds if bad in names else ds_test
        i = [f.name for f in where.files].index(bad)
        with pytest.raises(ValueError, match=bad):
            where[i]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="known datasets: shapes, shapes-near.*artbench"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        D.load_dataset("digits", split="val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_dataset(str(tmp_path / "nope"))
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        D.load_dataset(str(tmp_path / "file.jpg"))
    (tmp_path / "flat").mkdir()
    fake_image(tmp_path / "flat" / "0.jpg")
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.load_dataset(tmp_path / "flat")
    fake_image(tmp_path / "flat" / "a" / "0.jpg")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        D.load_dataset(tmp_path / "flat")
    with pytest.raises(ValueError, match="accepts"):
        D.load_dataset("shapes", n_trian=3)
    with pytest.raises(ValueError, match="no parameters"):
        D.load_dataset("cub", shift=0.3)
    with pytest.raises(ValueError, match="known datasets"):
        D.profile_of("nope")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        D.load_rgb(tmp_path / "missing.png")


def test_fashion_missing_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_DIRS", (tmp_path / "not_installed",))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion", root=tmp_path)


def _write_idx(path, a):
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    with gzip.open(path, "wb") as f: f.write(header + a.astype(np.uint8).tobytes())


def test_fashion_from_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_DIRS", ())
    d = tmp_path / "fashion"
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    tr, te = D.load_dataset("fashion", root=tmp_path), D.load_dataset("fashion", "test", root=tmp_path)
    assert (len(tr), len(te), tr.classes[0], tr.profile) == (12, 5, "T-shirt/top", "mini")
    assert tr.images.shape == (12, 32, 32, 3) and (tr.images[:, :2] == 0).all()  # padded 28 -> 32
    assert tr.targets.tolist() == [i % 10 for i in range(12)]
    assert D.load_dataset("fashion", root=tmp_path, image_size=16)[0][0].shape == (3, 16, 16)


@pytest.mark.skipif(not all((d / "t10k-images-idx3-ubyte.gz").is_file() for d in D.FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_from_debian_package(tmp_path):
    te = D.load_dataset("fashion", "test", root=tmp_path)
    assert len(te) == 10000 and np.bincount(te.targets).tolist() == [1000] * 10


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k): raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


SMALL = dict(n_train=6, n_test=3)


def test_every_mini_dataset_from_scratch(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("WAT_NB_DATA", str(tmp_path))
    assert D.data_root() == tmp_path and not list(tmp_path.iterdir())
    mini = [n for n, s in D.DATASETS.items() if s.profile == "mini"]
    assert mini == ["shapes", "shapes-near", "shapes-mid", "shapes-far", "digits", "fashion"]
    for name in mini:
        if name == "fashion":
            monkeypatch.setattr(D, "FASHION_DIRS", ())
            with pytest.raises(FileNotFoundError):
                D.load_dataset(name)
            continue
        kw = SMALL if name.startswith("shapes") else {}
        tr, te = D.load_dataset(name, **kw), D.load_dataset(name, "test", **kw)
        k = D.DATASETS[name].num_classes
        assert (tr.name, tr.profile, len(tr.classes)) == (name, "mini", k)
        if name.startswith("shapes"):
            assert np.bincount(tr.targets).tolist() == [6] * k and np.bincount(te.targets).tolist() == [3] * k
        x, y = tr[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
        assert tr.images.dtype == np.uint8 and tr.images.shape[1:] == (32, 32, 3)
        assert not {i.tobytes() for i in tr.images} & {i.tobytes() for i in te.images}
        small = D.load_dataset(name, "test", image_size=16, **kw)
        assert small[0][0].shape == (3, 16, 16) and np.array_equal(small.targets, te.targets)
    caches = sorted(p.name.split("-")[:-1] for p in (tmp_path / "mini").iterdir())
    assert caches == [["shapes"], ["shapes", "far"], ["shapes", "mid"], ["shapes", "near"]]
    assert not list((tmp_path / "mini").glob("*.tmp"))


def test_shapes_targets_know_their_source(tmp_path, monkeypatch):
    monkeypatch.setenv("WAT_NB_DATA", str(tmp_path))
    src = D.load_dataset("shapes", n_train=4, n_test=2)
    assert src.source_classes is None and src.classes[:2] == ["red circle", "lime circle"]
    seen = []
    for name in ("shapes-near", "shapes-mid", "shapes-far"):
        ds = D.load_dataset(name, **SMALL)
        s = ds.source_classes
        assert len(s) == 10 == len(set(s)) and all(0 <= c < 32 for c in s) and s != sorted(s)
        assert D.load_dataset(name, "test", **SMALL).source_classes == s
        seen.append(tuple(s))
        # rendering the true source classes with the same seed and shift reproduces the target exactly
        spec = D.DATASETS[name].params
        x, y = D.make_shapes(s, 6, shift=spec["shift"], seed=[spec["seed"], 0])
        assert np.array_equal(x, ds.images) and np.array_equal(y, ds.targets)
    assert len(set(seen)) == 3


def test_shapes_cache_is_deterministic_and_reused(tmp_path, monkeypatch):
    a = D.load_dataset("shapes-mid", root=tmp_path / "a", **SMALL)
    b = D.load_dataset("shapes-mid", root=tmp_path / "b", **SMALL)
    assert np.array_equal(a.images, b.images) and a.source_classes == b.source_classes
    f = next((tmp_path / "a" / "mini").iterdir())
    mtime = f.stat().st_mtime_ns
    monkeypatch.setattr(D, "make_shapes", lambda *a, **k: pytest.fail("cache not reused"))
    c = D.load_dataset("shapes-mid", "test", root=tmp_path / "a", **SMALL)
    assert f.stat().st_mtime_ns == mtime and len(c) == 30
    # other generator settings get their own cache file
    monkeypatch.undo()
    D.load_dataset("shapes-mid", root=tmp_path / "a", rotation=0.0, **SMALL)
    assert len(list((tmp_path / "a" / "mini").iterdir())) == 2


def test_max_per_class_and_transform(tmp_path):
    ds = D.load_dataset("digits", max_per_class=3, transform=lambda im: torch.zeros(1))
    assert np.bincount(ds.targets).tolist() == [3] * 10 and ds[0][0].shape == (1,)


def test_image_grid_and_show_dataset(tmp_path):
    g = D.image_grid(torch.rand(7, 3, 8, 8) * 2 - 1, nrow=4)
    assert g.shape == (2 * 9 + 1, 4 * 9 + 1, 3) and g.dtype == np.uint8
    g = D.image_grid(np.full((3, 5, 5, 3), 7, np.uint8), nrow=3, pad=0)
    assert g.shape == (5, 15, 3) and (g == 7).all()
    make_df20m(tmp_path / "df20m")
    for ds in (D.load_dataset("digits", "test"), D.load_dataset("df20m", root=tmp_path, image_size=16)):
        fig = D.show_dataset(ds, per_class=3, max_classes=2)
        assert len(fig.axes[0].get_yticklabels()) == 2
        matplotlib.pyplot.close(fig)
