"""Annotation download against a loopback HTTP server with Range support: resume, checksum, offline."""

from __future__ import annotations

import functools
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import tiny_params_dict
from lors.config import Params
from lors.data.download import ANNOTATION_URL_ENV, KNOWN_SHA256, download_file, fetch_annotations
from lors.data.prepare import prepare_dataset
from lors.errors import DataError
from lors.io import sha256_file


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single `bytes=N-` ranges (206), recording each request's Range header."""

    ranges: list[str | None]
    url: str
    honour_ranges = True

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.ranges.append(self.headers.get("Range"))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.honour_ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(shared_data: Path, monkeypatch) -> Iterator[type[RangeHandler]]:
    handler = type("Handler", (RangeHandler,), {"ranges": []})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(shared_data / "karpathy")))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    monkeypatch.setenv(ANNOTATION_URL_ENV, handler.url)
    yield handler
    httpd.shutdown()
    httpd.server_close()


def test_fetch_verifies_known_checksums(server, tmp_path: Path) -> None:
    names = ["flickr30k_test.json", "coco_karpathy_val.json"]
    paths = fetch_annotations(names, tmp_path / "ann")
    for name, path in zip(names, paths):
        assert sha256_file(path) == KNOWN_SHA256[name]
    assert server.ranges == [None, None] and not list((tmp_path / "ann").glob("*.part"))


def test_resumes_a_partial_download(server, shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "karpathy" / "flickr30k_val.json"
    dest = tmp_path / "flickr30k_val.json"
    Path(str(dest) + ".part").write_bytes(source.read_bytes()[:100_000])
    fetch_annotations(["flickr30k_val.json"], tmp_path)
    assert server.ranges == ["bytes=100000-"]
    assert dest.read_bytes() == source.read_bytes()


def test_complete_part_file_answered_416(server, shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "karpathy" / "flickr30k_test.json"
    Path(str(tmp_path / "flickr30k_test.json") + ".part").write_bytes(source.read_bytes())
    fetch_annotations(["flickr30k_test.json"], tmp_path)
    assert server.ranges == [f"bytes={source.stat().st_size}-"]
    assert sha256_file(tmp_path / "flickr30k_test.json") == KNOWN_SHA256["flickr30k_test.json"]


def test_server_without_range_support_restarts(server, shared_data: Path, tmp_path: Path) -> None:
    server.honour_ranges = False
    source = shared_data / "karpathy" / "flickr30k_test.json"
    Path(str(tmp_path / "flickr30k_test.json") + ".part").write_bytes(b"stale bytes")
    fetch_annotations(["flickr30k_test.json"], tmp_path)
    assert (tmp_path / "flickr30k_test.json").read_bytes() == source.read_bytes()


def test_checksum_mismatch_removes_the_part_file(server, tmp_path: Path) -> None:
    dest = tmp_path / "flickr30k_test.json"
    part = Path(str(dest) + ".part")
    part.write_bytes(b"X" * 5000)  # wrong bytes that a resume would append to
    with pytest.raises(DataError) as info:
        fetch_annotations(["flickr30k_test.json"], tmp_path)
    message = str(info.value)
    assert "sha256 mismatch" in message and str(dest) in message and "\n" not in message
    assert not part.exists() and not dest.exists()
    fetch_annotations(["flickr30k_test.json"], tmp_path)  # the next attempt starts clean and succeeds
    assert sha256_file(dest) == KNOWN_SHA256["flickr30k_test.json"]


def test_unknown_hash_is_accepted_without_verification(server, tmp_path: Path) -> None:
    download_file(server.url + "flickr30k_val.json", tmp_path / "copy.json", sha256=None)
    assert sha256_file(tmp_path / "copy.json") == KNOWN_SHA256["flickr30k_val.json"]


def test_missing_remote_file_and_offline(server, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"could not download flickr30k_train.json \(Not Found\)"):
        fetch_annotations(["flickr30k_test.json", "flickr30k_train.json"], tmp_path)
    assert (tmp_path / "flickr30k_test.json").is_file()  # what could be fetched is kept

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv(ANNOTATION_URL_ENV, f"http://127.0.0.1:{closed}/")
    with pytest.raises(DataError) as info:
        fetch_annotations(["coco_karpathy_val.json", "coco_karpathy_test.json"], tmp_path / "ann")
    message = str(info.value)
    assert "coco_karpathy_val.json" in message and "coco_karpathy_test.json" in message
    assert f"put the files in {tmp_path / 'ann'}" in message and "\n" not in message


def test_prepare_downloads_missing_annotations(server, tmp_path: Path) -> None:
    """prepare fetches the json files it lacks; the train file is not published here, so it stops
    with one line that names it, after fetching val and test into ann_root."""
    raw = tiny_params_dict(tmp_path / "work")
    (tmp_path / "images").mkdir()
    raw["datasets"]["f30k"] = {"kind": "flickr30k", "root": str(tmp_path / "images"),
                               "ann_root": str(tmp_path / "ann"), "download_annotations": True}
    with pytest.raises(DataError, match=r"could not download flickr30k_train.json"):
        prepare_dataset(Params.model_validate(raw), "f30k")
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["flickr30k_test.json", "flickr30k_val.json"]
