"""Every failure a user can cause ends in one line and exit code 2, with nothing left that looks finished.

One test per row of the reliability battery (issue 15): degenerate annotations, a read-only work_dir,
a work_dir under a file, a full disk while prepare writes a store and while distill checkpoints, a
truncated feature file, SIGTERM. The read-only and full-disk rows mount a small tmpfs (root only;
skipped where `mount` is not permitted); the full-disk row also runs everywhere with the disk space
reservation made to fail in-process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import fill_grid_cells, tiny_params_dict
from lors.cli import app
from lors.errors import os_error_line
from lors.io import read_json, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
SPACE = ("No space left on device — free space there (or set work_dir in params.yaml to a bigger disk) and rerun: "
         "finished work is kept and the stage resumes")


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line(result, code: int = 2) -> str:
    """The error line of a failed command: the last on stderr, the only one (progress bars aside), no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output and [line for line in lines if line.startswith("error")] == lines[-1:], \
        result.stderr
    return lines[-1]


def _temp_files(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if ".tmp" in p.name or p.name.endswith(".short")] if work.exists() else []


def _assert_nothing_finished(prepared: Path) -> None:
    """No manifest (what marks prepared data finished), no temp file, every store paired with its json."""
    assert not (prepared / "manifest.json").exists()
    assert _temp_files(prepared) == []
    if prepared.is_dir():
        stores = {p.name.removesuffix(".images.npy") for p in prepared.glob("*.images.npy")}
        assert {p.stem for p in prepared.glob("*.json")} <= stores


def _write_params(tmp_path: Path, work: Path, name: str = "params.yaml", **changes) -> Path:
    raw = tiny_params_dict(work)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(fill_grid_cells(raw)))
    return path


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at `folder`; the test is skipped where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# ------------------------------------------------------------------------------ annotations


@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    """A Flickr30k-layout dataset of 12 generated photos: train 8 x 5 captions, val 2, test 2."""
    root = tmp_path / "f30k"
    (root / "flickr30k-images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "flickr30k-images" / f"{i}.png")
    path = [f"flickr30k-images/{i}.png" for i in range(12)]
    rows = {"train": [{"image": path[i], "caption": f"photo {i} caption {k}", "image_id": str(i)}
                      for k in range(5) for i in range(8)],
            "val": [{"image": path[i], "caption": [f"val {i} a", f"val {i} b"]} for i in (8, 9)],
            "test": [{"image": path[i], "caption": [f"test {i} a", f"test {i} b"]} for i in (10, 11)]}
    for split, content in rows.items():
        (root / f"flickr30k_{split}.json").write_text(json.dumps(content))
    return root


def _flickr_params(tmp_path: Path, root: Path, budget: int = 20) -> Path:
    raw = tiny_params_dict(tmp_path / "work")
    raw["datasets"]["f30k"] = {"kind": "flickr30k", "root": str(root), "image_size": 16, "download_annotations": False}
    raw["grid"].update(distill_budgets=[budget], select_budgets=[10])
    raw["experts"]["batch_size"] = 8
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(fill_grid_cells(raw)))
    return path


def _edit(path: Path, change) -> None:
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(change(rows)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_annotation_list_is_refused(tmp_path: Path, flickr: Path, split: str) -> None:
    (flickr / f"flickr30k_{split}.json").write_text("[]")
    line = _one_line(_cli("prepare", "-d", "f30k", "-p", str(_flickr_params(tmp_path, flickr))))
    assert line == f"error: {flickr / f'flickr30k_{split}.json'}: the {split} split is empty (no image-text pairs); check the file"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("split", "change", "message"), [
    ("train", lambda rows: rows[:3] + [{**rows[3], "caption": ""}] + rows[4:], "row 3: empty caption ''"),
    ("train", lambda rows: rows[:5] + [{**rows[5], "caption": " ... "}], "row 5: empty caption ' ... '"),
    ("test", lambda rows: [rows[0], {**rows[1], "caption": ["a dog", ""]}], "row 1: empty caption ''"),
])
def test_empty_captions_are_refused(tmp_path: Path, flickr: Path, split: str, change, message: str) -> None:
    _edit(flickr / f"flickr30k_{split}.json", change)
    line = _one_line(_cli("prepare", "-d", "f30k", "-p", str(_flickr_params(tmp_path, flickr))))
    assert line == f"error: {flickr / f'flickr30k_{split}.json'}: {message}; remove the row or write a caption"
    assert not (tmp_path / "work").exists()


def test_an_image_without_captions_is_refused(tmp_path: Path, flickr: Path) -> None:
    _edit(flickr / "flickr30k_test.json", lambda rows: [rows[0], {**rows[1], "caption": []}])
    line = _one_line(_cli("prepare", "-d", "f30k", "-p", str(_flickr_params(tmp_path, flickr))))
    assert line == (f"error: {flickr / 'flickr30k_test.json'}: row 1: image 'flickr30k-images/11.png' has no caption; "
                    "remove the row or add captions")
    assert not (tmp_path / "work").exists()


def test_a_split_smaller_than_the_largest_budget_is_refused(tmp_path: Path, flickr: Path) -> None:
    line = _one_line(_cli("prepare", "-d", "f30k", "-p", str(_flickr_params(tmp_path, flickr, budget=41))))
    assert line == (f"error: {flickr / 'flickr30k_train.json'}: the train split has 40 image-text pairs, fewer than "
                    "grid.distill_budgets (41) needs; lower that setting or use more data")
    assert not (tmp_path / "work").exists()


def test_duplicated_images_and_captions_are_counted(tmp_path: Path, flickr: Path) -> None:
    _edit(flickr / "flickr30k_test.json", lambda rows: [rows[0], {**rows[1], "caption": ["Test 10 A.", "x"]}, rows[0]])
    _edit(flickr / "flickr30k_train.json", lambda rows: rows + rows[:3])
    result = _cli("prepare", "-d", "f30k", "-p", str(_flickr_params(tmp_path, flickr)))
    assert result.exit_code == 0, result.output
    splits = read_json(tmp_path / "work" / "f30k" / "prepared" / "manifest.json")["splits"]
    # test: image 10 listed twice (2 rows), its 2 captions again, and "Test 10 A." normalises to "test 10 a"
    assert (splits["test"]["duplicate_images"], splits["test"]["duplicate_captions"]) == (1, 3)
    assert (splits["train"]["duplicate_images"], splits["train"]["duplicate_captions"]) == (0, 3)
    assert (splits["val"]["duplicate_images"], splits["val"]["duplicate_captions"]) == (0, 0)


# ------------------------------------------------------------------------------- work_dir


def test_work_dir_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    params = _write_params(tmp_path, tmp_path / "afile" / "work")
    line = _one_line(_cli("prepare", "-d", "embedded", "-p", str(params)))
    assert line.startswith(f"error: {tmp_path / 'afile' / 'work'}")
    assert line.endswith(f": Not a directory — {tmp_path / 'afile'} is a file, not a folder: move it or choose "
                         "another work_dir")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_read_only_work_dir(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        line = _one_line(_cli("prepare", "-d", "embedded", "-p", str(_write_params(tmp_path, ro / "work"))))
        assert line == (f"error: {ro / 'work'}: Read-only file system — the filesystem is read-only: set work_dir "
                        "in params.yaml to a writable folder")


@pytest.mark.parametrize(("code", "advice"), [
    (errno.EACCES, "fix its permissions or set work_dir in params.yaml to a folder you can write"),
    (errno.EPERM, "fix its permissions or set work_dir in params.yaml to a folder you can write"),
    (errno.EEXIST, "a file stands where a folder must go: move it or choose another work_dir"),
    (errno.EIO, "rerun with --debug (or LORS_DEBUG=1) to see where it happened"),
])
def test_os_errors_read_as_path_reason_advice(code: int, advice: str) -> None:
    # root ignores permission bits, so these errors are built rather than provoked
    assert os_error_line(OSError(code, os.strerror(code), "/w/x")) == f"/w/x: {os.strerror(code)} — {advice}"


def test_a_vanished_work_file_names_its_producer(tmp_path: Path) -> None:
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "embedded" / "prepared" / "x.npy"))
    assert os_error_line(missing).endswith("— run `lors-bench prepare --dataset embedded` (again) to write it")
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/img.jpg")
    assert os_error_line(elsewhere) == ("/data/img.jpg: No such file or directory — check that it exists and was "
                                        "not moved or deleted while the stage ran, then rerun")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    params = str(_write_params(tmp_path, tmp_path / "afile" / "work"))
    result = CliRunner().invoke(app, ["--debug", "prepare", "-d", "embedded", "-p", params])
    assert isinstance(result.exception, NotADirectoryError) and result.exit_code == 1
    result = CliRunner().invoke(app, ["prepare", "-d", "embedded", "-p", params], env={"LORS_DEBUG": "1"})
    assert isinstance(result.exception, NotADirectoryError)


# ----------------------------------------------------------------------------- full disk


def _store_params(tmp_path: Path, work: Path) -> Path:
    """Train and test stores of 3 MB each (1000 images of 3 x 32 x 32), val 0.3 MB."""
    return _write_params(tmp_path, work, datasets={"embedded": {
        "kind": "embedded", "image_size": 32,
        "embedded": {"n_train": 1000, "n_val": 100, "n_test": 1000, "captions_per_image": 1}}})


def test_disk_full_while_prepare_writes_a_store_then_resumes(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "5m") as disk:
        params = str(_store_params(tmp_path, disk / "work"))
        prepared = disk / "work" / "embedded" / "prepared"
        line = _one_line(_cli("prepare", "-d", "embedded", "-p", params))
        assert line == f"error: {prepared / 'test.images.npy'}: {SPACE}"
        _assert_nothing_finished(prepared)
        assert sorted(p.name for p in prepared.iterdir()) == ["train.images.npy", "train.json", "val.images.npy",
                                                              "val.json"]
        train_mtime = (prepared / "train.images.npy").stat().st_mtime_ns
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)  # space freed
        assert _cli("prepare", "-d", "embedded", "-p", params).exit_code == 0
        assert (prepared / "train.images.npy").stat().st_mtime_ns == train_mtime  # resumed, not redone
        assert (prepared / "manifest.json").is_file() and _temp_files(prepared) == []


def test_disk_full_in_process(tmp_path: Path, monkeypatch) -> None:
    """The same row without a tmpfs: the store's disk space reservation fails as on a full disk."""
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    prepared = tmp_path / "work" / "embedded" / "prepared"
    line = _one_line(_cli("prepare", "-d", "embedded", "-p", str(_write_params(tmp_path, tmp_path / "work"))))
    assert line == f"error: {prepared / 'train.images.npy'}: {SPACE}"
    _assert_nothing_finished(prepared)
    assert list(prepared.iterdir()) == []


@pytest.mark.slow
def test_disk_full_while_distill_writes_a_checkpoint(tmp_path: Path) -> None:
    """Checkpoints on a full disk: one line naming the checkpoint; after freeing space distill finishes."""
    work = tmp_path / "work"
    params = str(_write_params(
        tmp_path, work, grid={"datasets": ["embedded"], "experts": [0], "distill_methods": ["lors"], "distill_budgets": [4],
                              "select_methods": ["random"], "select_budgets": [4]},
        datasets={"embedded": {"kind": "embedded", "image_size": 16,
                               "embedded": {"n_train": 10, "n_val": 10, "n_test": 10, "captions_per_image": 2}}},
        experts={"epochs": 2, "batch_size": 5},
        distill={"checkpoint_every": 2, "lors": {"default": {"iterations": 3, "mini_batch": 4, "syn_steps": 2,
                                                             "lr_img": 1, "lr_txt": 1, "lr_sim": 1, "lr_lr": 1e-4,
                                                             "rank": 2}}}))
    for stage in ("prepare", "embed-text"):
        assert _cli(stage, "-d", "embedded", "-p", params).exit_code == 0, stage
    assert _cli("experts", "-d", "embedded", "--expert", "0", "-p", params).exit_code == 0
    with _tmpfs(work / "checkpoints", "8k"):
        line = _one_line(_cli("distill", "-d", "embedded", "-b", "4", "-m", "lors", "-p", params))
        state = work / "checkpoints" / "embedded" / "distill" / "lors-4" / "latest.pt"
        assert line == f"error: {state}: {SPACE}"
        assert _temp_files(work) == []
        assert not (work / "embedded" / "synsets" / "lors-4").exists()
        subprocess.run(["mount", "-o", "remount,size=10m", str(work / "checkpoints")], check=True)  # space freed
        result = _cli("distill", "-d", "embedded", "-b", "4", "-m", "lors", "-p", params)
        assert result.exit_code == 0, result.output


def test_a_damaged_store_is_rebuilt_and_the_rest_reused(tmp_path: Path) -> None:
    params = str(_write_params(tmp_path, tmp_path / "work"))
    prepared = tmp_path / "work" / "embedded" / "prepared"
    assert _cli("prepare", "-d", "embedded", "-p", params).exit_code == 0
    files = {p.name: p.read_bytes() for p in prepared.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    (prepared / "train.images.npy").write_bytes(files["train.images.npy"][:-100])
    assert _cli("prepare", "-d", "embedded", "-p", params).exit_code == 0
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == files
    rewritten = {name for name in files if (prepared / name).stat().st_mtime_ns != mtimes[name]}
    assert rewritten == {"train.images.npy", "train.json", "manifest.json"}  # val and test reused


# ---------------------------------------------------------------------------- text features


def test_truncated_text_features_are_one_line_and_embed_text_rewrites_them(tmp_path: Path) -> None:
    params = str(_write_params(
        tmp_path, tmp_path / "work", grid={"datasets": ["embedded"], "distill_budgets": [5], "select_budgets": [5]},
        datasets={"embedded": {"kind": "embedded", "image_size": 16,
                               "embedded": {"n_train": 10, "n_val": 10, "n_test": 10, "captions_per_image": 1}}},
        experts={"batch_size": 5}))
    assert _cli("prepare", "-d", "embedded", "-p", params).exit_code == 0
    assert _cli("embed-text", "-d", "embedded", "-p", params).exit_code == 0
    path = tmp_path / "work" / "embedded" / "text" / "minilm" / "train.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    line = _one_line(_cli("select", "-d", "embedded", "-b", "5", "-m", "random", "-p", params))
    assert line.startswith(f"error: {path}: damaged feature file (")
    assert line.endswith("): run `lors-bench embed-text --dataset embedded` again to rewrite it")
    assert not (tmp_path / "work" / "embedded" / "synsets").exists()
    assert _cli("embed-text", "-d", "embedded", "-p", params).exit_code == 0
    assert path.read_bytes() == whole  # re-encoded, byte for byte what the first run wrote
    assert _cli("select", "-d", "embedded", "-b", "5", "-m", "random", "-p", params).exit_code == 0


def test_feature_files_are_byte_identical_across_writes_and_processes(tmp_path: Path) -> None:
    """safetensors writes its metadata dict in hash order, which changes from one write (and process) to
    the next; save_safetensors must not."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    features = torch.arange(6.0).reshape(2, 3)
    metadata = {"encoder": "minilm", "pooling": "mean", "split": "train", "n": "2", "z": "1"}
    assert len({save({"features": features}, metadata=metadata) for _ in range(10)}) > 1  # the defect is live
    blobs = set()
    for i in range(10):
        save_safetensors(tmp_path / f"{i}.safetensors", {"features": features}, metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    script = ("import sys, torch; from lors.io import save_safetensors; save_safetensors(sys.argv[1], "
              f"{{'features': torch.arange(6.0).reshape(2, 3)}}, {metadata!r})")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other.safetensors")], check=True, cwd=ROOT)
    blobs.add((tmp_path / "other.safetensors").read_bytes())
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "other.safetensors"), "pt") as fh:
        assert fh.metadata() == metadata and torch.equal(fh.get_tensor("features"), features)


# ---------------------------------------------------------------------------------- SIGTERM

_SIGTERM_SCRIPT = textwrap.dedent("""
    import contextlib, sys, time
    import lors.data.image_store as store
    import lors.tracking as tracking
    from lors.cli import app

    def stall():
        print("STALLING", flush=True)
        time.sleep(60)

    real_atomic = store.atomic_path

    @contextlib.contextmanager
    def stalled_atomic(path):
        with real_atomic(path) as tmp:
            tmp.write_bytes(b"half a store")
            stall()
            yield tmp

    if sys.argv[2] == "store":  # killed while the first image store is half written
        store.atomic_path = stalled_atomic
    else:  # killed inside the stage's tracked run
        tracking.Tracker.log_metrics = lambda self, metrics, step=None: stall()
    app(["prepare", "-d", "embedded", "-p", sys.argv[1]])
""")


@pytest.mark.parametrize("where", ["store", "record"])
def test_sigterm_unwinds_the_stage(tmp_path: Path, where: str) -> None:
    work = tmp_path / "work"
    params = _write_params(tmp_path, work, tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'db.sqlite'}"})
    env = {**os.environ, "LORS_TRACKING": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(params), where], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STALLING"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("terminated (SIGTERM); finished work is kept and the stage resumes "
                                              "when run again")
    assert _temp_files(work) == []
    records = list((work / "tracking" / "pending").iterdir()) if (work / "tracking").exists() else []
    if where == "store":
        _assert_nothing_finished(work / "embedded" / "prepared")
        assert records == []
    else:
        assert len(records) == 1 and read_json(records[0] / "record.json")["status"] == "FAILED"
