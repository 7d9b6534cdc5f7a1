"""The shared synthetic-set file format round-trips exactly."""

from __future__ import annotations

import pytest
import torch

from lors.synset import SyntheticSet


def test_round_trip(tmp_path):
    s = SyntheticSet(images=torch.randn(3, 3, 8, 8), texts=torch.randn(3, 5), similarity=torch.eye(3) * 0.9,
                     lr_img=0.05, lr_txt=0.2, meta={"method": "lors", "budget": 4, "indices": [1, 2, 3]},
                     extra={"w": torch.ones(3)})
    path = tmp_path / "a" / "synset.safetensors"
    s.save(path)
    t = SyntheticSet.load(path)
    torch.testing.assert_close(t.images, s.images)
    torch.testing.assert_close(t.similarity, s.similarity)
    assert t.lr_img == pytest.approx(0.05) and t.lr_txt == pytest.approx(0.2)
    assert t.meta == s.meta and set(t.extra) == {"w"}
    assert not list(path.parent.glob(".*tmp*"))


def test_inconsistent_shapes_rejected():
    with pytest.raises(ValueError, match="inconsistent"):
        SyntheticSet(torch.zeros(3, 3, 4, 4), torch.zeros(2, 5), torch.eye(3), 0.1, 0.1)


def test_missing_file_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run distill or select first"):
        SyntheticSet.load(tmp_path / "nope.safetensors")
