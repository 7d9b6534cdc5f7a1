"""Frozen text features: pooling against direct model calls, batching, the cache, bad names, the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import fill_grid_cells, tiny_params_dict
from lors.cli import app
from lors.config import Params, TextEncoderConfig
from lors.data import load_split, load_text_features
from lors.data import text_features as tf
from lors.errors import ConfigError, DataError

CAPTIONS = ["a red circle to the left of a blue square", "two small green crosses",
            "a dog runs on the grass", "there is a large yellow ring at the top left of the picture",
            "a striped white background with a black diamond", "people"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """MiniLM on a few captions is fastest single-threaded; two threads on a shared, busy CPU spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm() -> tf.TextEncoder:
    return tf.load_text_encoder("minilm", torch.device("cpu"))


def _single(encoder: tf.TextEncoder, caption: str) -> torch.Tensor:
    """Hidden states of one caption alone (no padding at all)."""
    with torch.no_grad():
        batch = encoder.tokenizer([caption], return_tensors="pt")
        return encoder.model(**batch).last_hidden_state[0]


def test_cls_and_mean_pooling_match_unpadded_single_captions(minilm: tf.TextEncoder) -> None:
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    cls = tf.encode_captions(CAPTIONS, TextEncoderConfig(name="minilm", pooling="cls", batch_size=4), "cpu", minilm)
    mean = tf.encode_captions(CAPTIONS, TextEncoderConfig(name="minilm", pooling="mean", batch_size=4), "cpu", minilm)
    assert cls.shape == mean.shape == (len(CAPTIONS), 384) and cls.dtype == mean.dtype == torch.float32
    for i, caption in enumerate(CAPTIONS):  # batches are padded to their longest; masks must hide it
        hidden = _single(minilm, caption)
        torch.testing.assert_close(cls[i], hidden[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mean[i], hidden.mean(0), atol=2e-5, rtol=1e-4)
    assert (cls - mean).abs().max() > 0.1


def test_encoder_is_deterministic_and_batch_independent(minilm: tf.TextEncoder) -> None:
    cfg = TextEncoderConfig(name="minilm", pooling="mean", batch_size=len(CAPTIONS))
    whole = tf.encode_captions(CAPTIONS, cfg, "cpu", minilm)
    pieces = tf.encode_captions(CAPTIONS, cfg.model_copy(update={"batch_size": 1}), "cpu", minilm)
    torch.testing.assert_close(whole, pieces, atol=2e-5, rtol=1e-4)
    assert tf.encode_captions([], cfg, "cpu", minilm).shape == (0, 384)
    repeated = [CAPTIONS[-1], *CAPTIONS, CAPTIONS[0]]  # duplicates are encoded once, rows keep their order
    torch.testing.assert_close(tf.encode_captions(repeated, cfg, "cpu", minilm),
                               torch.cat([whole[-1:], whole, whole[:1]]), atol=2e-5, rtol=1e-4)


def test_unknown_names_fail_with_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lors.hub.hub_reachable", lambda timeout=5.0: False)  # hermetic: never touch the network
    with pytest.raises(ConfigError) as info:
        tf.load_text_encoder("no-such-text-encoder-xyz", torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("text_encoder.name: 'no-such-text-encoder-xyz'") and "\n" not in message
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ConfigError) as info:
        tf.load_text_encoder(str(tmp_path / "not_a_model"), torch.device("cpu"))
    assert "cannot load" in str(info.value) and "\n" not in str(info.value)


def _params_file(tmp_path: Path, pooling: str = "mean") -> Path:
    raw = tiny_params_dict(tmp_path / "work")
    raw["datasets"]["embedded"]["embedded"] = {"n_train": 10, "n_val": 10, "n_test": 10, "captions_per_image": 1}
    raw["grid"].update(distill_budgets=[5], select_budgets=[5])  # prepare refuses budgets over the 10 pairs
    raw["experts"]["batch_size"] = 5
    raw["text_encoder"]["pooling"] = pooling
    path = tmp_path / f"params-{pooling}.yaml"
    path.write_text(yaml.safe_dump(fill_grid_cells(raw)))
    return path


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cli_embed_text_caches_features(tmp_path: Path, minilm: tf.TextEncoder) -> None:
    runner = CliRunner()
    params_file = _params_file(tmp_path)
    params = Params.model_validate(yaml.safe_load(params_file.read_text()))
    with pytest.raises(DataError, match="run `lors-bench prepare --dataset embedded` first"):
        tf.embed_dataset(params, "embedded")
    missing = runner.invoke(app, ["embed-text", "--dataset", "embedded", "--params", str(params_file)])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1

    assert runner.invoke(app, ["prepare", "-d", "embedded", "-p", str(params_file)]).exit_code == 0
    with pytest.raises(DataError, match="run `lors-bench embed-text --dataset embedded` first"):
        load_text_features(params, "embedded", "train")
    result = runner.invoke(app, ["embed-text", "-d", "embedded", "-p", str(params_file)])
    assert result.exit_code == 0, result.output

    folder = params.work_dir / "embedded" / "text" / "minilm"
    for split in ("train", "val", "test"):
        features = load_text_features(params, "embedded", split)
        captions = load_split(params, "embedded", split).captions
        assert features.shape == (10, 384) and features.dtype == torch.float32
        with safe_open(str(folder / f"{split}.safetensors"), "pt") as fh:
            assert list(fh.keys()) == ["features"]
    expected = tf.encode_captions(captions, params.text_encoder, "cpu", minilm)
    torch.testing.assert_close(load_text_features(params, "embedded", "test"), expected)

    before = _mtimes(folder)
    assert runner.invoke(app, ["embed-text", "-d", "embedded", "-p", str(params_file)]).exit_code == 0
    assert _mtimes(folder) == before  # valid cache: nothing re-encoded

    cls_file = _params_file(tmp_path, pooling="cls")
    cls_params = Params.model_validate(yaml.safe_load(cls_file.read_text()))
    with pytest.raises(DataError, match="cached with pooling 'mean', params ask for 'cls'"):
        load_text_features(cls_params, "embedded", "test")
    assert runner.invoke(app, ["embed-text", "-d", "embedded", "-p", str(cls_file)]).exit_code == 0
    cls_features = load_text_features(cls_params, "embedded", "test")
    assert not torch.allclose(cls_features, expected)


def test_features_of_other_captions_are_refused(tiny_params) -> None:
    """Features left from an earlier prepare must not be paired with the new captions."""
    import json

    from lors.data import load_text_features
    from lors.data.prepare import prepare_dataset
    from lors.errors import DataError
    from lors.paths import Layout

    prepare_dataset(tiny_params, "embedded")
    tf.embed_dataset(tiny_params, "embedded")
    assert load_text_features(tiny_params, "embedded", "test").shape[0] == 100
    meta_path = Layout(tiny_params.work_dir).prepared("embedded") / "test.json"
    meta = json.loads(meta_path.read_text())
    meta["captions"][0] = "a caption the features were not computed from"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="encodes other captions than the prepared test split"):
        load_text_features(tiny_params, "embedded", "test")
