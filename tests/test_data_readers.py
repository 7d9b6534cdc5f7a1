"""Caption normalisation and the annotation readers, on hand-made cases and the real shared files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lors.data.captions import pre_caption
from lors.data.readers import SPLITS, read_flickr8k, read_karpathy, read_karpathy_eval, read_karpathy_train
from lors.errors import DataError


@pytest.mark.parametrize("raw, expected", [
    ("A Dog runs.", "a dog runs"),
    ('"Hello" (World)*#:;~ there!', "hello world there"),
    ("two   men,  one woman's hat - ok\n", "two men, one woman's hat - ok"),
    ("  padded  ", "padded"),
    ("a.b", "a b"),
    ("", ""),
])
def test_pre_caption_cases(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_keeps_first_max_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption(" ".join(words), max_words=3) == "w0 w1 w2"
    assert pre_caption("one two three", max_words=3) == "one two three"


def test_flickr8k_official_counts(shared_data: Path) -> None:
    splits = read_flickr8k(shared_data / "flickr8k")
    counts = {s: (len(r.image_names), len(r.captions)) for s, r in splits.items()}
    assert counts == {"train": (6000, 30000), "val": (1000, 5000), "test": (1000, 5000)}
    train = splits["train"]
    assert np.array_equal(np.bincount(train.txt2img), np.full(6000, 5))
    assert train.image_paths[0].is_file()
    assert not set(train.image_names) & set(splits["test"].image_names)
    # first token line of the release: 1000268201_693b08cb0e.jpg#0
    first = train.image_names.index("Flicker8k_Dataset/1000268201_693b08cb0e.jpg")
    assert train.captions[np.flatnonzero(train.txt2img == first)[0]].startswith("A child in a pink dress")


@pytest.mark.parametrize("folder, kind, expected", [
    ("coco-mini", "coco", {"train": (196, 980), "val": (21, 105), "test": (22, 110)}),
    ("ucm-captions", "flickr30k", {"train": (1680, 8400), "val": (210, 1050), "test": (210, 1050)}),
])
def test_karpathy_layouts_on_real_files(shared_data: Path, folder: str, kind: str, expected: dict) -> None:
    root = shared_data / folder
    for split in SPLITS:
        raw = read_karpathy(root, root, kind, split)
        assert (len(raw.image_names), len(raw.captions)) == expected[split]
        assert len(raw.txt2img) == len(raw.captions)
        assert all(path.is_file() for path in raw.image_paths)


@pytest.mark.parametrize("kind, split, images, captions, six", [
    ("flickr30k", "test", 1000, 5000, 0), ("flickr30k", "val", 1014, 5070, 0),
    ("coco", "test", 5000, 25010, 10), ("coco", "val", 5000, 25010, 10),
])
def test_karpathy_eval_files(shared_data: Path, kind: str, split: str, images: int, captions: int, six: int) -> None:
    raw = read_karpathy(shared_data / "karpathy", shared_data, kind, split)
    per_image = np.bincount(raw.txt2img, minlength=len(raw.image_names))
    assert (len(raw.image_names), len(raw.captions)) == (images, captions)
    assert int((per_image == 6).sum()) == six and int((per_image == 5).sum()) == images - six


def _write(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_train_rows_group_images_in_first_seen_order(tmp_path: Path) -> None:
    rows = [{"image": "b.jpg", "caption": "b0", "image_id": "2"}, {"image": "a.jpg", "caption": "a0", "image_id": "1"},
            {"image": "b.jpg", "caption": "b1", "image_id": "2"}]
    raw = read_karpathy_train(_write(tmp_path / "t.json", rows), tmp_path)
    assert raw.image_names == ["b.jpg", "a.jpg"]
    assert raw.captions == ["b0", "a0", "b1"]
    assert raw.txt2img.tolist() == [0, 1, 0] and raw.txt2img.dtype == np.int64


def test_eval_rows_allow_any_caption_count(tmp_path: Path) -> None:
    rows = [{"image": "a.jpg", "caption": ["x", "y", "z"]}, {"image": "b.jpg", "caption": ["w"]}]
    raw = read_karpathy_eval(_write(tmp_path / "v.json", rows), tmp_path)
    assert raw.txt2img.tolist() == [0, 0, 0, 1] and raw.captions == ["x", "y", "z", "w"]


@pytest.mark.parametrize("content, reader, fragment", [
    ("[{\"image\": ", read_karpathy_train, "not valid JSON"),
    ({"image": "a.jpg"}, read_karpathy_train, "expected a JSON list"),
    ([{"image": "a.jpg", "caption": "x"}, {"caption": "y"}], read_karpathy_train, "row 1: missing key 'image'"),
    ([{"image": "a.jpg", "caption": ["x"]}], read_karpathy_train, "row 0: 'caption' has type list"),
    ([{"image": "a.jpg", "caption": "x"}], read_karpathy_eval, "row 0: 'caption' has type str"),
    ([{"image": "a.jpg", "caption": ["x", 3]}], read_karpathy_eval, "row 0: a caption has type int"),
    (["a.jpg"], read_karpathy_eval, "row 0: expected an object"),
])
def test_malformed_karpathy_names_file_and_row(tmp_path: Path, content, reader, fragment: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as info:
        reader(path, tmp_path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_missing_karpathy_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="flickr30k_val.json: annotation file not found"):
        read_karpathy(tmp_path, tmp_path, "flickr30k", "val")


def _flickr8k_release(root: Path, token_lines: list[str]) -> Path:
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for name, images in [("train", ["a.jpg"]), ("dev", ["b.jpg"]), ("test", ["c.jpg"])]:
        (root / f"Flickr_8k.{name}Images.txt").write_text("\n".join(images) + "\n")
    return root


def test_flickr8k_small_release_and_malformed_lines(tmp_path: Path) -> None:
    good = ["a.jpg#0\tA cat .", "b.jpg#0\tA dog .", "a.jpg#1\tA kitten .", "c.jpg#0\tA bird ."]
    splits = read_flickr8k(_flickr8k_release(tmp_path / "ok", good))
    assert splits["train"].captions == ["A cat .", "A kitten ."] and splits["train"].txt2img.tolist() == [0, 0]
    assert splits["val"].image_names == ["Flicker8k_Dataset/b.jpg"]

    broken = _flickr8k_release(tmp_path / "bad", good[:2] + ["a.jpg A kitten without tab"])
    with pytest.raises(DataError, match=r"Flickr8k.token.txt: line 3: expected"):
        read_flickr8k(broken)

    uncaptioned = _flickr8k_release(tmp_path / "gap", good[:3])
    with pytest.raises(DataError, match=r"Flickr_8k.testImages.txt: line 1: 'c.jpg' has no caption"):
        read_flickr8k(uncaptioned)
