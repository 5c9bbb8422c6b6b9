"""Getting the data: resumable, checksummed downloads for datasets with stable public archives,
and where every other dataset comes from and which folder it must end up in.

    adaclip sources                       # the table below
    adaclip download mvtec --root data    # -> data/mvtec/<category>/...
    adaclip download mvtec --root data --url https://mirror/mvtec.tar.xz --sha256 HASH   # a link died

Automatic: MVTec AD, VisA, BTAD and KolektorSDD (sha256 as published), Kvasir-SEG (no published
checksum: the first download's hash is recorded and later ones are checked against it).
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Source:
    name: str
    folder: str             # under the data root, as the adapters expect
    where: str              # homepage / how to get it
    urls: tuple = ()        # direct archive links, tried in order (a dead mirror is not fatal)
    sha256: str = ""        # published checksum; empty: the first download's hash is recorded instead
    layout: str = ""
    archive_root: str = ""  # folder inside the archive that holds the layout (moved up on extraction)
    filename: str = ""      # archive name on disk (default: the last part of the first URL)

    @property
    def archive_name(self) -> str:
        return self.filename or Path(self.urls[0]).name


SOURCES = {s.name: s for s in [
    # The first MVTec AD link is the one anomalib downloads today; the second is the older link its
    # users reported dead (HTTP 404, anomalib issue #3441), kept in case it comes back. Same archive.
    Source("mvtec", "mvtec", "https://www.mvtec.com/company/research/datasets/mvtec-ad (CC BY-NC-SA 4.0)",
           ("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
            "mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
            "mvtec_anomaly_detection.tar.xz"),
           "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
           "<category>/{train,test}/<type>/*.png, <category>/ground_truth/<type>/*_mask.png"),
    Source("visa", "visa", "https://github.com/amazon-science/spot-diff (CC BY 4.0)",
           ("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
           "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
           "<object>/Data/{Images,Masks}/..., split_csv/1cls.csv (copy it from spot-diff if missing)"),
    Source("mpdd", "mpdd", "https://github.com/stepanje/MPDD", layout="MVTec AD layout"),
    Source("btad", "btad", "https://avires.dimi.uniud.it/papers/btad/btad.zip (BTech)",
           ("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
           "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
           layout="01|02|03/{train/ok,test/{ok,ko},ground_truth/ko}", archive_root="BTech_Dataset_transformed"),
    Source("ksdd", "ksdd", "https://www.vicos.si/resources/kolektorsdd/ (KolektorSDD v1, CC BY-NC-SA 4.0)",
           ("https://go.vicos.si/kolektorsdd",),
           "65dc621693418585de9c4467d1340ea7958a6181816f0dc2883a1e8b61f9d4dc",
           layout="kosNN/PartK.jpg + PartK_label.bmp (adapter option strips=3 cuts each image in three as the reference)",
           filename="KolektorSDD.zip"),
    Source("dagm", "dagm", "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
           layout="ClassN/{Train,Test}/NNNN.PNG + Label/NNNN_label.PNG"),
    Source("dtd", "dtd", "https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1 (DTD-Synthetic, Aota et al. WACV 2023)",
           layout="MVTec AD layout"),
    Source("headct", "headct", "https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage",
           layout="labels.csv + head_ct/NNN.png (Kaggle's zip nests them: head_ct/head_ct/NNN.png; both are read)"),
    Source("brainmri", "brainmri", "https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
           layout="no/*.jpg, yes/*.jpg"),
    Source("br35h", "br35h", "https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection",
           layout="no/*.jpg, yes/*.jpg"),
    Source("isic", "isic", "https://challenge.isic-archive.com/data/#2016 (ISBI 2016 Part 1)",
           layout="ISBI2016_ISIC_Part1_Test_Data/, ISBI2016_ISIC_Part1_Test_GroundTruth/"),
    # The owner's page serves .bmp frames with masks in another layout; what the adapter reads (and
    # what the zero-shot papers evaluate) is the PraNet test-set repack (TestDataset/CVC-ColonDB).
    Source("colondb", "colondb", "PraNet's test-set repack (github.com/DengPingFan/PraNet, TestDataset/CVC-ColonDB); "
           "the owner's page http://vi.cvc.uab.es/colon-qa/cvccolondb/ serves .bmp frames in another layout",
           layout="images/, masks/ (PraNet repack)"),
    Source("clinicdb", "clinicdb", "https://polyp.grand-challenge.org/CVCClinicDB/",
           layout="Original/, Ground Truth/ (or PNG/Original, PNG/Ground Truth)"),
    # no published checksum: the first download's sha256 is recorded and later downloads must match it
    Source("kvasir", "kvasir", "https://datasets.simula.no/kvasir-seg/", ("https://datasets.simula.no/downloads/kvasir-seg.zip",),
           layout="images/, masks/", archive_root="Kvasir-SEG"),
    Source("tn3k", "tn3k", "https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation",
           layout="{trainval,test}-image/, {trainval,test}-mask/"),
]}


class DownloadError(RuntimeError):
    pass


def sha256sum(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Union[str, Path], sha256: str = "", timeout: float = 60, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part``; verify ``sha256`` if given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (not sha256 or sha256sum(dest) == sha256):
        return dest
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if start and response.status != 206:      # server ignored the range: start over
                start = 0
            total = int(response.headers.get("Content-Length") or 0) + start
            with open(part, "ab" if start else "wb") as f, \
                    tqdm(total=total or None, initial=start, unit="B", unit_scale=True, desc=dest.name) as bar:
                for block in iter(lambda: response.read(chunk), b""):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:
        raise DownloadError(f"downloading {url} failed ({e}); run the same command again to resume "
                            f"from {part} ({part.stat().st_size if part.exists() else 0} bytes so far)") from e
    if sha256:
        got = sha256sum(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(f"checksum mismatch for {url}: got sha256 {got}, expected {sha256}; "
                                f"the partial file was removed, run again to re-download")
    os.replace(part, dest)
    return dest


def extract(archive: Union[str, Path], dest: Union[str, Path]) -> Path:
    """Unpack a .tar(.gz/.xz) or .zip archive into ``dest`` (no paths outside it)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if not (dest / member).resolve().is_relative_to(dest.resolve()):
                    raise DownloadError(f"{archive}: member {member} would land outside {dest}")
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        raise DownloadError(f"{archive} is neither a tar nor a zip archive")
    return dest


def fetch(name: str, root: Union[str, Path], url: Optional[str] = None, sha256: Optional[str] = None) -> Path:
    """Download and extract dataset ``name`` into ``root/<folder>``; resumes; skips when done.

    The source's links are tried in order until one gives the expected file; ``url`` (and
    ``sha256``) replace them, e.g. when every known link has died. A source without a published
    checksum has the first download's sha256 recorded beside the archive (``<archive>.sha256``),
    and later downloads must match it.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    urls = [url] if url else list(src.urls)
    if not urls:
        raise DownloadError(f"{name} has no stable public archive; get it from {src.where} and put it in "
                            f"{Path(root) / src.folder} as: {src.layout}")
    target = Path(root) / src.folder
    done = target / ".adaclip-extracted"
    if done.is_file():
        return target
    archive = Path(root) / ".downloads" / src.archive_name
    expected = src.sha256 if sha256 is None else sha256
    recorded = archive.with_name(archive.name + ".sha256")
    if not expected and sha256 is None and recorded.is_file():
        expected = recorded.read_text().split()[0]
    errors = []
    for link in urls:
        try:
            download(link, archive, expected)
            break
        except DownloadError as e:
            errors.append(f"  {link}: {e}")
    else:
        raise DownloadError(
            f"could not download {name} from any of its {len(urls)} link(s):\n" + "\n".join(errors) +
            f"\nIf every link is dead, find the archive elsewhere ({src.where}) and run "
            f"`adaclip download {name} --url URL [--sha256 HASH]`, or unpack it yourself into "
            f"{target} as: {src.layout}")
    if not expected:
        digest = sha256sum(archive)
        recorded.write_text(f"{digest}  {archive.name}\n")
        print(f"{name}: no published checksum; recorded sha256 {digest} in {recorded}; "
              f"later downloads are checked against it")
    extract(archive, target)
    if src.archive_root and (target / src.archive_root).is_dir():
        inner = target / src.archive_root
        for item in inner.iterdir():
            os.replace(item, target / item.name)
        inner.rmdir()
    done.write_text(f"{archive.name}\n")
    return target


def sources_table():
    """A pandas table: dataset, folder under the data root, where to get it, expected layout."""
    import pandas as pd

    return pd.DataFrame([dict(dataset=s.name, folder=s.folder, download=("auto, sha256-checked" if s.sha256 else "auto, unchecked on first download") if s.urls else "manual",
                              where=s.where, layout=s.layout) for s in SOURCES.values()])
