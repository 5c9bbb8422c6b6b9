"""Download helpers against a local HTTP server on 127.0.0.1 (never the internet)."""
import dataclasses
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
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
    table = sources_table().set_index("dataset")
    assert {"mvtec", "visa", "mpdd", "btad", "ksdd", "dagm", "dtd", "headct", "brainmri", "br35h", "isic",
            "colondb", "clinicdb", "kvasir", "tn3k"} <= set(table.index)
    for name in ("mvtec", "visa", "btad", "ksdd"):
        assert len(SOURCES[name].sha256) == 64 and table.loc[name, "download"] == "auto, sha256-checked"
    # Kvasir-SEG publishes no checksum: the table must not call it checked
    assert not SOURCES["kvasir"].sha256 and "unchecked" in table.loc["kvasir", "download"]
    assert "PraNet" in table.loc["colondb", "where"] and "owner" in table.loc["colondb", "where"]
    with pytest.raises(DownloadError, match="brainmri"):
        fetch("brainmri", Path("/tmp/nowhere"))


def test_mvtec_uses_the_live_link_first():
    """anomalib's users reported the old share dead (404, anomalib #3441); the live one comes first."""
    urls = SOURCES["mvtec"].urls
    assert urls[0].startswith("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/")
    assert all(u.endswith("mvtec_anomaly_detection.tar.xz") for u in urls) and len(set(urls)) == len(urls)
    assert SOURCES["mvtec"].sha256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"


def test_dead_mirror_falls_back_to_the_next(server, tmp_path, monkeypatch):
    url, handler = server
    archive = _mvtec_archive()
    handler.files["/live/mvtec_anomaly_detection.tar.xz"] = archive
    src = dataclasses.replace(SOURCES["mvtec"], urls=(url + "/dead/mvtec_anomaly_detection.tar.xz",
                                                      url + "/live/mvtec_anomaly_detection.tar.xz"),
                              sha256=hashlib.sha256(archive).hexdigest())
    monkeypatch.setitem(SOURCES, "mvtec", src)
    fetch("mvtec", tmp_path)
    assert build_manifest("mvtec", tmp_path).label.tolist() == [1, 0]
    # both links dead: one error that names every link and the way out
    monkeypatch.setitem(SOURCES, "mvtec", dataclasses.replace(src, urls=(url + "/a.tar.xz", url + "/b.tar.xz")))
    with pytest.raises(DownloadError, match=r"(?s)any of its 2 link.*/a\.tar\.xz.*/b\.tar\.xz.*--url URL"):
        fetch("mvtec", tmp_path / "again")


def test_cli_download_takes_url_and_sha256(server, tmp_path, capsys):
    from adaclip import cli
    url, handler = server
    archive = _mvtec_archive()
    handler.files["/mirror.tar.gz"] = archive
    assert cli.main(["download", "mvtec", "--root", str(tmp_path / "bad"), "--url", url + "/mirror.tar.gz",
                     "--sha256", "0" * 64]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli.main(["download", "mvtec", "--root", str(tmp_path), "--url", url + "/mirror.tar.gz",
                     "--sha256", hashlib.sha256(archive).hexdigest()]) == 0
    assert handler.ranges and build_manifest("mvtec", tmp_path).label.tolist() == [1, 0]


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _png(mode="RGB", size=(8, 8), value=None, fmt="PNG", box=None) -> bytes:
    from PIL import Image
    import numpy as np
    a = np.zeros((size[1], size[0]) + ((3,) if mode == "RGB" else ()), np.uint8)
    a[...] = 100 if value is None else value
    if box is not None:
        a[box[1]:box[3], box[0]:box[2]] = 255
    out = io.BytesIO()
    Image.fromarray(a).save(out, format=fmt)
    return out.getvalue()


def test_btad_archive_lands_in_the_adapter_layout(server, tmp_path, monkeypatch):
    """btad.zip holds BTech_Dataset_transformed/01/...; the adapter reads btad/01/..."""
    url, handler = server
    top = "BTech_Dataset_transformed"
    body = _zip({f"{top}/01/train/ok/0000.bmp": _png(fmt="BMP"), f"{top}/01/test/ok/0001.bmp": _png(fmt="BMP"),
                 f"{top}/01/test/ko/0002.bmp": _png(fmt="BMP"),
                 f"{top}/01/ground_truth/ko/0002.png": _png("L", value=0, box=(1, 1, 4, 4))})
    handler.files["/btad.zip"] = body
    monkeypatch.setitem(SOURCES, "btad", dataclasses.replace(SOURCES["btad"], urls=(url + "/btad.zip",),
                                                             sha256=hashlib.sha256(body).hexdigest()))
    fetch("btad", tmp_path)
    df = build_manifest("btad", tmp_path)
    check(df, tmp_path)
    assert df[["category", "split", "label"]].values.tolist() == [["01", "test", 1], ["01", "test", 0],
                                                                  ["01", "train", 0]]


def test_ksdd_archive_lands_in_the_adapter_layout(server, tmp_path, monkeypatch):
    """KolektorSDD.zip holds kos01..kos50 at its top; the link has no file name of its own."""
    url, handler = server
    body = _zip({"kos01/Part0.jpg": _png(fmt="JPEG"), "kos01/Part0_label.bmp": _png("L", value=0, fmt="BMP"),
                 "kos01/Part1.jpg": _png(fmt="JPEG"),
                 "kos01/Part1_label.bmp": _png("L", value=0, fmt="BMP", box=(2, 2, 5, 5))})
    handler.files["/kolektorsdd"] = body
    monkeypatch.setitem(SOURCES, "ksdd", dataclasses.replace(SOURCES["ksdd"], urls=(url + "/kolektorsdd",),
                                                             sha256=hashlib.sha256(body).hexdigest()))
    fetch("ksdd", tmp_path)
    assert (tmp_path / ".downloads" / "KolektorSDD.zip").is_file()
    df = build_manifest("ksdd", tmp_path)
    check(df, tmp_path)
    assert df.label.tolist() == [0, 1]


def test_unpublished_checksum_is_recorded_and_enforced(server, tmp_path, monkeypatch, capsys):
    """Kvasir-SEG: the first download's sha256 is kept; a later download of other bytes is refused."""
    url, handler = server
    first = _zip({"Kvasir-SEG/images/a.jpg": _png(fmt="JPEG"), "Kvasir-SEG/masks/a.jpg": _png("L", fmt="JPEG")})
    handler.files["/kvasir-seg.zip"] = first
    monkeypatch.setitem(SOURCES, "kvasir", dataclasses.replace(SOURCES["kvasir"], urls=(url + "/kvasir-seg.zip",)))
    fetch("kvasir", tmp_path)
    recorded = tmp_path / ".downloads" / "kvasir-seg.zip.sha256"
    assert recorded.read_text().split()[0] == hashlib.sha256(first).hexdigest()
    assert "no published checksum" in capsys.readouterr().out
    # the archive changes upstream (or a proxy mangles it): the next fresh download is refused
    handler.files["/kvasir-seg.zip"] = first + b"tampered"
    (tmp_path / ".downloads" / "kvasir-seg.zip").unlink()
    (tmp_path / "kvasir" / ".adaclip-extracted").unlink()
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch("kvasir", tmp_path)


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
