from __future__ import annotations

import hashlib
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from histoflow._constants import Key
from histoflow.datasets._her2st import DATA_ENV, HER2ST_REGISTRY, URL_ENV, her2st


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path_factory):
    """Serve a folder over HTTP on 127.0.0.1 (a thread, stopped at the end); returns (base URL, request log)."""
    servers = []

    def start(folder: Path) -> tuple[str, list[str]]:
        log: list[str] = []
        handler = type("Handler", (_Handler,), {"requests": log})
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/", log

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
def no_local(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_registry_matches_the_public_files(her2st_dir):
    # every registered file is one of the local copies of the public files, with the registered hash
    assert len(HER2ST_REGISTRY) == 30 * 2 + 5 + 7
    for name in ("ST-cnts/C2.tsv.gz", "ST-spotfiles/H3_selection.tsv", "ST-imgs/C/C3/5714_HE_BT_D1.jpg"):
        assert _sha256(her2st_dir / name) == HER2ST_REGISTRY[name]
    assert not any(k.startswith("ST-cnts/B") for k in HER2ST_REGISTRY)


def test_download_two_sections(her2st_dir, tmp_path, serve, monkeypatch, no_local):
    url, log = serve(her2st_dir)
    monkeypatch.setenv(URL_ENV, url)
    cache = tmp_path / "cache"
    sdata = her2st(["C2", "C3"], cache_dir=cache)
    table = sdata.tables[Key.table]
    assert table.obs[Key.library].value_counts().to_dict() == {"C2": 187, "C3": 180}
    assert sorted(sdata.images) == ["C2_full_image", "C3_full_image"]
    expected = [
        "ST-cnts/C2.tsv.gz",
        "ST-spotfiles/C2_selection.tsv",
        "ST-imgs/C/C2/5714_HE_BT_C2.jpg",
        "ST-cnts/C3.tsv.gz",
        "ST-spotfiles/C3_selection.tsv",
        "ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    ]
    assert sorted(p.lstrip("/") for p in log) == sorted(expected)
    for name in expected:
        assert _sha256(cache / name) == HER2ST_REGISTRY[name]
    # cached: a second call downloads nothing
    again = her2st("C2", cache_dir=cache, load_images=False)
    assert len(log) == len(expected)
    assert again.tables[Key.table].n_obs == 187
    # a section with pathologist labels fetches them too
    labelled = her2st("A1", cache_dir=cache, load_images=False).tables[Key.table]
    assert "/ST-pat/lbl/A1_labeled_coordinates.tsv" in log
    assert labelled.obs["label"].notna().all()


def test_corrupted_file_fails_the_hash_check(her2st_dir, tmp_path, serve, monkeypatch, no_local):
    mirror = tmp_path / "mirror"
    for sub in ("ST-cnts", "ST-spotfiles"):
        (mirror / sub).mkdir(parents=True)
    shutil.copy(her2st_dir / "ST-cnts" / "C2.tsv.gz", mirror / "ST-cnts")
    text = (her2st_dir / "ST-spotfiles" / "C2_selection.tsv").read_text()
    (mirror / "ST-spotfiles" / "C2_selection.tsv").write_text(text.replace("6930.58", "6930.59", 1))
    url, _ = serve(mirror)
    monkeypatch.setenv(URL_ENV, url)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="'ST-spotfiles/C2_selection.tsv' .* failed its SHA256 check"):
        her2st("C2", cache_dir=cache, load_images=False)
    assert not (cache / "ST-spotfiles" / "C2_selection.tsv").exists()  # nothing corrupt is kept


def test_unreachable_server(tmp_path, monkeypatch, no_local):
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ConnectionError, match="Could not download HER2ST file 'ST-cnts/C2.tsv.gz'.*pass `path=`"):
        her2st("C2", cache_dir=tmp_path, load_images=False)


def test_local_folder_and_env(her2st_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")  # any download attempt would fail
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert her2st("C2", path=her2st_dir, load_images=False).tables[Key.table].n_obs == 187
    monkeypatch.setenv(DATA_ENV, str(shared_data))  # a folder holding her2st/
    table = her2st(["A1", "C1"], load_images=False).tables[Key.table]
    assert table.obs[Key.library].value_counts().to_dict() == {"A1": 346, "C1": 176}


def test_bad_sections(tmp_path, monkeypatch, no_local):
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")
    with pytest.raises(KeyError, match=r"\['B1'\], which cannot be downloaded.*Patient B"):
        her2st(["C2", "B1"], cache_dir=tmp_path)
    with pytest.raises(KeyError, match=r"\['Z9'\], which cannot be downloaded; available: \['A1'"):
        her2st("Z9", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`sections` is empty"):
        her2st([], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        her2st("C2", path=tmp_path / "nope")
    assert not any(tmp_path.iterdir())  # nothing was downloaded
