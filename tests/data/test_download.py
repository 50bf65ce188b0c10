"""COCO 2017 download against a local HTTP server: verify, unzip, resume, corruption, idempotence."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from detsweep.data.coco import build_datasets
from detsweep.data.download import (
    DEFAULT_MANIFEST,
    ChecksumError,
    download_file,
    fetch_coco2017,
)

BLOB = random.Random(0).randbytes(300_000)


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours `Range: bytes=N-` unless the path starts with /norange/;
    /truncate/ paths announce the full length but send half and close. Logs every request."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        name = self.path.removeprefix("/norange").removeprefix("/truncate")
        data = server.files.get(name)
        rng = self.headers.get("Range")
        if data is None:
            server.log.append((self.path, rng, 0))
            self.send_error(404)
            return
        start = 0
        if rng and not self.path.startswith("/norange/"):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                server.log.append((self.path, rng, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/truncate/"):
            body = body[: len(body) // 2]
            self.close_connection = True
        # Log before sending: the client may finish reading and the test assert on the log
        # before this thread runs again after the write.
        server.log.append((self.path, rng, len(body)))
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # loopback only
    httpd.files, httpd.log = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _coco_json(image_id: int) -> bytes:
    return json.dumps({
        "images": [{"id": image_id, "file_name": f"{image_id:012d}.png", "width": 16, "height": 12}],
        "annotations": [{"id": image_id, "image_id": image_id, "category_id": 18, "bbox": [1, 1, 5, 5],
                         "area": 25, "iscrowd": 0}],
        "categories": [{"id": 18, "name": "dog"}],
    }).encode()


@pytest.fixture()
def archives(server) -> dict:
    """Small COCO-shaped zips on the server, and a manifest of their real sha256."""
    zips = {
        "train2017.zip": _zip({"train2017/000000000001.png": _png(1)}),
        "val2017.zip": _zip({"val2017/000000000002.png": _png(2)}),
        "annotations_trainval2017.zip": _zip({"annotations/instances_train2017.json": _coco_json(1),
                                              "annotations/instances_val2017.json": _coco_json(2)}),
    }
    manifest = {}
    for name, data in zips.items():
        path = DEFAULT_MANIFEST[name]["path"]
        server.files["/" + path] = data
        manifest[name] = {"path": path, "algo": "sha256", "digest": _sha256(data)}
    return {"zips": zips, "manifest": manifest}


def test_fetch_verifies_unzips_into_layout(tmp_path, server, archives):
    root = fetch_coco2017(tmp_path / "coco", manifest=archives["manifest"], base_url=server.url)
    assert (root / "images" / "train2017" / "000000000001.png").read_bytes() == _png(1)
    assert (root / "images" / "val2017" / "000000000002.png").read_bytes() == _png(2)
    assert (root / "annotations" / "instances_val2017.json").read_bytes() == _coco_json(2)
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations", "annotations_trainval2017.zip.complete", "images", "train2017.zip.complete",
        "val2017.zip.complete"]  # archives removed, no .part or scratch folders left
    assert len(server.log) == 3 and all(rng is None for _, rng, _ in server.log)
    train, val, label_map, _ = build_datasets(kind="coco", root=root, train_images=0, val_images=0,
                                              image_size=800, classes=None)
    assert (len(train), len(val), label_map.category_ids) == (1, 1, (18,))


def test_second_fetch_makes_no_request(tmp_path, server, archives):
    kw = dict(manifest=archives["manifest"], base_url=server.url)
    fetch_coco2017(tmp_path, **kw)
    served = list(server.log)
    fetch_coco2017(tmp_path, **kw)
    assert server.log == served


def test_fetch_one_split_and_keep_archives(tmp_path, server, archives):
    fetch_coco2017(tmp_path, splits=("val",), manifest=archives["manifest"], base_url=server.url,
                   keep_archives=True)
    assert [p for p, _, _ in server.log] == ["/annotations/annotations_trainval2017.zip", "/zips/val2017.zip"]
    assert (tmp_path / "val2017.zip").read_bytes() == archives["zips"]["val2017.zip"]
    assert not (tmp_path / "images" / "train2017").exists()


def test_fetch_unknown_split(tmp_path):
    with pytest.raises(ValueError) as err:
        fetch_coco2017(tmp_path, splits=("test",))
    assert str(err.value) == "unknown split 'test'; choose from ['train', 'val']"


def test_resume_from_truncated_part_uses_range(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:100_000])
    download_file(f"{server.url}/blob.bin", dest, expected=("sha256", _sha256(BLOB)), chunk=4096)
    assert server.log == [("/blob.bin", "bytes=100000-", 200_000)]
    assert dest.read_bytes() == BLOB and not (tmp_path / "blob.bin.part").exists()


def test_interrupted_transfer_resumes_on_next_call(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    with pytest.raises(OSError, match=r"/truncate/blob.bin ended early: 150000 of 300000 bytes; run again to resume"):
        download_file(f"{server.url}/truncate/blob.bin", dest, expected=("sha256", _sha256(BLOB)))
    assert (tmp_path / "blob.bin.part").stat().st_size == 150_000 and not dest.exists()
    download_file(f"{server.url}/blob.bin", dest, expected=("sha256", _sha256(BLOB)))
    assert server.log[-1] == ("/blob.bin", "bytes=150000-", 150_000)
    assert dest.read_bytes() == BLOB


def test_complete_part_is_verified_without_body(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected=("sha256", _sha256(BLOB)))
    assert server.log == [("/blob.bin", "bytes=300000-", 0)]  # 416: nothing left to send
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)
    download_file(f"{server.url}/norange/blob.bin", tmp_path / "blob.bin", expected=("sha256", _sha256(BLOB)))
    assert server.log == [("/norange/blob.bin", "bytes=1000-", 300_000)]
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_corrupted_download_names_file_and_digests(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    wanted = _sha256(b"something else")
    url = f"{server.url}/blob.bin"
    with pytest.raises(ChecksumError) as err:
        download_file(url, tmp_path / "blob.bin", expected=("sha256", wanted))
    assert str(err.value) == (
        f"blob.bin: sha256 mismatch: expected {wanted}, got {_sha256(BLOB)} (from {url}); "
        f"the download was deleted, run again to retry")
    assert list(tmp_path.iterdir()) == []


def test_corrupted_archive_stops_fetch_without_marker(tmp_path, server, archives):
    manifest = {**archives["manifest"]}
    manifest["val2017.zip"] = {**manifest["val2017.zip"], "digest": "0" * 64}
    with pytest.raises(ChecksumError, match=f"val2017.zip: sha256 mismatch: expected {'0' * 64}, got "):
        fetch_coco2017(tmp_path, splits=("val",), manifest=manifest, base_url=server.url)
    assert (tmp_path / "annotations_trainval2017.zip.complete").exists()
    assert not (tmp_path / "val2017.zip.complete").exists() and not (tmp_path / "val2017.zip").exists()


def test_md5_manifest_entries_work(tmp_path, server):
    server.files["/blob.bin"] = BLOB
    download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected=("md5", hashlib.md5(BLOB).hexdigest()))
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_verified_file_is_not_fetched_again(tmp_path, server):
    (tmp_path / "blob.bin").write_bytes(BLOB)
    download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected=("sha256", _sha256(BLOB)))
    assert server.log == []


def test_unknown_algorithm_and_http_error(tmp_path, server):
    with pytest.raises(ValueError, match=r"digest algorithm 'sha1' is not one of \['md5', 'sha256'\]"):
        download_file(f"{server.url}/x", tmp_path / "x", expected=("sha1", "00"))
    with pytest.raises(OSError, match=r"download of .*/missing.bin failed: HTTP 404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "missing.bin", expected=("sha256", "0" * 64))


def test_default_manifest_is_well_formed():
    assert set(DEFAULT_MANIFEST) == {"train2017.zip", "val2017.zip", "annotations_trainval2017.zip"}
    for name, entry in DEFAULT_MANIFEST.items():
        assert entry["path"].endswith("/" + name)
        assert entry["algo"] == "sha256" and re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
        assert re.fullmatch(r"[0-9a-f]{32}", entry["md5"]) and entry["size"] > 0
