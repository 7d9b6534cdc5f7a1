"""Image store and the prepare stage: decoding, bad files, skipping, rebuild-on-change, the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_params_dict
from lors.cli import app
from lors.config import Params
from lors.data import load_split
from lors.data.image_store import build_image_store, open_image_store
from lors.data.prepare import prepare_dataset
from lors.errors import DataError
from lors.io import read_json, sha256_file

UCM_IMAGES = [f"{i}.jpg" for i in range(1, 8)]


@pytest.fixture
def tiny_flickr(shared_data: Path, tmp_path: Path) -> Path:
    """A 7-image Flickr30k-layout dataset built from real UCM photos: train 3, val 2, test 2."""
    root = tmp_path / "flickr"
    (root / "flickr30k-images").mkdir(parents=True)
    for name in UCM_IMAGES:
        shutil.copy(shared_data / "ucm-captions" / "flickr30k-images" / name, root / "flickr30k-images" / name)
    path = [f"flickr30k-images/{name}" for name in UCM_IMAGES]
    train = [{"image": path[i], "caption": f"Photo {i}, caption {k}.", "image_id": str(i)}
             for k in range(2) for i in range(3)]
    val = [{"image": path[i], "caption": [f"val {i} a", f"val {i} b"]} for i in (3, 4)]
    test = [{"image": path[i], "caption": [f"test {i} a", f"test {i} b", f"test {i} c"]} for i in (5, 6)]
    for split, rows in [("train", train), ("val", val), ("test", test)]:
        (root / f"flickr30k_{split}.json").write_text(json.dumps(rows))
    return root


def _params(tmp_path: Path, root: Path, **dataset) -> Params:
    raw = tiny_params_dict(tmp_path / "work")
    raw["grid"].update(distill_budgets=[2], select_budgets=[2])  # the 6 train pairs must hold every budget
    raw["experts"]["batch_size"] = 2
    raw["datasets"]["flickr"] = {"kind": "flickr30k", "root": str(root), "image_size": 16,
                                 "download_annotations": False, **dataset}
    return Params.model_validate(raw)


def test_store_matches_bicubic_resize_without_crop(tiny_flickr: Path, tmp_path: Path) -> None:
    # the reference's test transform is torchvision Resize((S, S), bicubic) on a PIL image, which is
    # PIL's own bicubic resize of the RGB image (torchvision is not imported here: it is slow to load)
    paths = sorted((tiny_flickr / "flickr30k-images").glob("*.jpg"))
    wide = tmp_path / "wide.png"  # 40x10: left quarter red, rest blue; a centre crop would lose the red
    canvas = np.zeros((10, 40, 3), dtype=np.uint8)
    canvas[:, :10] = (255, 0, 0)
    canvas[:, 10:] = (0, 0, 255)
    Image.fromarray(canvas).convert("P").save(wide)  # palette mode: the store must convert to RGB
    out = tmp_path / "store.npy"
    assert build_image_store([*paths, wide], out, 16) == []
    store = np.load(out, mmap_mode="r")
    assert isinstance(store, np.memmap) and store.shape == (8, 3, 16, 16) and store.dtype == np.uint8
    for i, path in enumerate(paths):
        expected = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
        assert np.array_equal(store[i], np.asarray(expected).transpose(2, 0, 1))
    squashed = store[-1]
    assert np.all(squashed[0, :, :3] == 255) and np.all(squashed[2, :, :3] == 0)  # red kept, full height
    assert np.all(squashed[2, :, 6:] == 255) and np.all(squashed[0, :, 6:] == 0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_truncated_and_missing_images(tiny_flickr: Path, tmp_path: Path) -> None:
    good = tiny_flickr / "flickr30k-images" / "1.jpg"
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8not a jpeg at all" * 50)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    for bad in (garbage, truncated, tmp_path / "missing.jpg"):
        out = tmp_path / "store.npy"
        with pytest.raises(DataError) as info:
            build_image_store([good, bad], out, 16)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
        assert not out.exists() and not list(tmp_path.glob(".store.npy.tmp*"))


def test_skip_bad_images_keeps_the_rest_in_order(tiny_flickr: Path, tmp_path: Path) -> None:
    paths = sorted((tiny_flickr / "flickr30k-images").glob("*.jpg"))
    paths[1].write_bytes(b"garbage")
    paths[4].unlink()
    out = tmp_path / "store.npy"
    assert build_image_store(paths, out, 16, skip_bad=True, workers=2) == [1, 4]
    reference = tmp_path / "reference.npy"
    build_image_store([p for i, p in enumerate(paths) if i not in (1, 4)], reference, 16)
    assert np.array_equal(open_image_store(out), np.load(reference))


def test_prepare_skips_bad_images_and_remaps_captions(tiny_flickr: Path, tmp_path: Path, caplog) -> None:
    (tiny_flickr / "flickr30k-images" / "2.jpg").write_bytes(b"broken")  # train image 1
    (tiny_flickr / "flickr30k-images" / "7.jpg").unlink()  # test image 1
    params = _params(tmp_path, tiny_flickr)
    with pytest.raises(DataError, match="7.jpg: image file not found"):
        prepare_dataset(params, "flickr")
    params = _params(tmp_path, tiny_flickr, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        prepare_dataset(params, "flickr")
    assert "skipped 1 of 3 images" in caplog.text
    train = load_split(params, "flickr", "train")
    assert train.image_names == ["flickr30k-images/1.jpg", "flickr30k-images/3.jpg"]
    # every kept caption still points at its own image: caption "photo i" belongs to image i
    assert [(c, train.image_names[j]) for c, j in zip(train.captions, train.txt2img)] == [
        ("photo 0, caption 0", "flickr30k-images/1.jpg"), ("photo 2, caption 0", "flickr30k-images/3.jpg"),
        ("photo 0, caption 1", "flickr30k-images/1.jpg"), ("photo 2, caption 1", "flickr30k-images/3.jpg")]
    test = load_split(params, "flickr", "test")
    assert test.n_images == 1 and test.captions == ["test 5 a", "test 5 b", "test 5 c"]
    manifest = read_json(params.work_dir / "flickr" / "prepared" / "manifest.json")
    assert manifest["splits"]["train"]["skipped_images"] == ["flickr30k-images/2.jpg"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_prepare_writes_layout_and_rebuilds_only_on_change(tiny_flickr: Path, tmp_path: Path, caplog) -> None:
    params = _params(tmp_path, tiny_flickr)
    out, _ = prepare_dataset(params, "flickr")
    assert out == params.work_dir / "flickr" / "prepared"
    manifest = read_json(out / "manifest.json")
    for name, entry in manifest["outputs"].items():
        assert sha256_file(out / name) == entry["sha256"]
    split = load_split(params, "flickr", "val")
    assert split.captions == ["val 3 a", "val 3 b", "val 4 a", "val 4 b"] and split.txt2img.tolist() == [0, 0, 1, 1]
    assert split.images.shape == (2, 3, 16, 16)

    before = _mtimes(out)
    with caplog.at_level(logging.INFO):
        prepare_dataset(params, "flickr")
    assert "up to date" in caplog.text and _mtimes(out) == before

    # a changed train image rebuilds train only; the manifest records the new hash
    image = tiny_flickr / "flickr30k-images" / "1.jpg"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(image)
    prepare_dataset(params, "flickr")
    after = _mtimes(out)
    assert after["train.images.npy"] != before["train.images.npy"]
    assert after["test.images.npy"] == before["test.images.npy"] and after["val.json"] == before["val.json"]
    assert np.all(load_split(params, "flickr", "train").images[0][0] >= 250)  # red (JPEG-compressed)
    assert read_json(out / "manifest.json")["input_hash"] != manifest["input_hash"]

    # a changed annotation or image size rebuilds too
    ann = tiny_flickr / "flickr30k_test.json"
    ann.write_text(ann.read_text().replace("test 5 a", "test 5 z"))
    prepare_dataset(params, "flickr")
    assert "test 5 z" in load_split(params, "flickr", "test").captions
    bigger = _params(tmp_path, tiny_flickr, image_size=20)
    prepare_dataset(bigger, "flickr")
    assert load_split(bigger, "flickr", "train").images.shape == (3, 3, 20, 20)


def test_prepare_embedded_and_missing_inputs(tmp_path: Path, tiny_params: Params) -> None:
    prepare_dataset(tiny_params, "embedded")
    train = load_split(tiny_params, "embedded", "train")
    assert train.images.shape == (60, 3, 16, 16) and train.n_captions == 300
    assert np.array_equal(train.txt2img, np.repeat(np.arange(60), 5))

    with pytest.raises(DataError, match=r"root: .*nowhere does not exist; .*hsankesara/flickr-image-dataset"):
        prepare_dataset(_params(tmp_path, tmp_path / "nowhere"), "flickr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"missing flickr30k_train.json, flickr30k_val.json, flickr30k_test.json in "):
        prepare_dataset(_params(tmp_path, tmp_path / "empty"), "flickr")
    with pytest.raises(DataError, match="run `lors-bench prepare --dataset flickr` first"):
        load_split(_params(tmp_path, tmp_path / "empty"), "flickr", "train")


def test_cli_prepare(tmp_path: Path) -> None:
    raw = tiny_params_dict(tmp_path / "work")
    raw["datasets"]["embedded"]["embedded"] = {"n_train": 10, "n_val": 10, "n_test": 10, "captions_per_image": 2}
    raw["experts"]["batch_size"] = 20
    raw["datasets"]["flickr"] = {"kind": "flickr30k", "root": str(tmp_path / "absent")}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    ok = runner.invoke(app, ["prepare", "--dataset", "embedded", "--params", str(params_file)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "work" / "embedded" / "prepared" / "manifest.json").is_file()
    missing = runner.invoke(app, ["prepare", "--dataset", "flickr", "--params", str(params_file)])
    assert missing.exit_code == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: datasets.flickr.root:") and "absent" in lines[0]
    assert not (tmp_path / "work" / "flickr").exists()
