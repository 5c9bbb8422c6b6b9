"""Download helpers against a local HTTP server on 127.0.0.1 (never the internet)."""
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from adaclip.data import build_manifest, check
from adaclip.data.download import SOURCES, DownloadError, download, fetch, sources_table


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    ranges: list = []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.files, RangeHandler.ranges = {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}", RangeHandler
    httpd.shutdown()
    httpd.server_close()


def _mvtec_archive() -> bytes:
    """A tiny MVTec-layout tar.gz, as the official archive is laid out (categories at the top)."""
    from PIL import Image
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, mode in (("bottle/test/good/000.png", "RGB"), ("bottle/test/broken/000.png", "RGB"),
                           ("bottle/ground_truth/broken/000_mask.png", "L")):
            png = io.BytesIO()
            Image.new(mode, (8, 8), 255 if mode == "L" else (1, 2, 3)).save(png, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()


def test_download_resumes_and_checks_sha256(server, tmp_path):
    url, handler = server
    body = bytes(range(256)) * 400
    handler.files["/f.bin"] = body
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(body[:1000])          # a killed earlier download
    download(url + "/f.bin", dest, sha256=hashlib.sha256(body).hexdigest(), chunk=4096)
    assert dest.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    assert handler.ranges[-1] == "bytes=1000-"


def test_checksum_mismatch_removes_partial(server, tmp_path):
    url, handler = server
    handler.files["/f.bin"] = b"abc" * 100
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_unreachable_url_says_how_to_resume(tmp_path):
    with pytest.raises(DownloadError, match="run the same command again"):
        download("http://127.0.0.1:9/none.tar", tmp_path / "none.tar", timeout=2)


def test_fetch_extracts_into_the_adapter_folder(server, tmp_path):
    url, handler = server
    archive = _mvtec_archive()
    handler.files["/mvtec_anomaly_detection.tar.gz"] = archive
    target = fetch("mvtec", tmp_path, url=url + "/mvtec_anomaly_detection.tar.gz",
                   sha256=hashlib.sha256(archive).hexdigest())
    assert target == tmp_path / "mvtec"
    df = build_manifest("mvtec", tmp_path)
    check(df, tmp_path)
    assert df.label.tolist() == [1, 0]
    # a second call finds it done and does not download again
    n = len(handler.ranges)
    fetch("mvtec", tmp_path, url=url + "/mvtec_anomaly_detection.tar.gz")
    assert len(handler.ranges) == n


def test_sources_cover_every_dataset_and_manual_ones_explain():
    table = sources_table()
    assert {"mvtec", "visa", "mpdd", "btad", "ksdd", "dagm", "dtd", "headct", "brainmri", "br35h", "isic",
            "colondb", "clinicdb", "kvasir", "tn3k"} <= set(table.dataset)
    assert SOURCES["mvtec"].sha256 and SOURCES["visa"].sha256
    with pytest.raises(DownloadError, match="brainmri"):
        fetch("brainmri", Path("/tmp/nowhere"))


def test_archive_root_is_moved_up(server, tmp_path):
    """Kvasir-SEG's zip holds Kvasir-SEG/{images,masks}; the adapter expects kvasir/{images,masks}."""
    import zipfile
    from PIL import Image
    url, handler = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for sub in ("images", "masks"):
            png = io.BytesIO()
            Image.new("L" if sub == "masks" else "RGB", (8, 8), 255).save(png, format="JPEG")
            z.writestr(f"Kvasir-SEG/{sub}/a.jpg", png.getvalue())
    handler.files["/kvasir-seg.zip"] = buf.getvalue()
    fetch("kvasir", tmp_path, url=url + "/kvasir-seg.zip", sha256="")
    df = build_manifest("kvasir", tmp_path)
    check(df, tmp_path)
    assert df.image.tolist() == ["kvasir/images/a.jpg"]
