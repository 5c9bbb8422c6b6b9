"""Getting the data: resumable, checksummed downloads for datasets with stable public archives,
and where every other dataset comes from and which folder it must end up in.

    adaclip sources                       # the table below
    adaclip download mvtec --root data    # -> data/mvtec/<category>/...
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
    url: str = ""           # direct archive (stable public link), if any
    sha256: str = ""
    layout: str = ""
    archive_root: str = ""  # folder inside the archive that holds the layout (moved up on extraction)


SOURCES = {s.name: s for s in [
    Source("mvtec", "mvtec", "https://www.mvtec.com/company/research/datasets/mvtec-ad (CC BY-NC-SA 4.0)",
           "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
           "mvtec_anomaly_detection.tar.xz",
           "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
           "<category>/{train,test}/<type>/*.png, <category>/ground_truth/<type>/*_mask.png"),
    Source("visa", "visa", "https://github.com/amazon-science/spot-diff (CC BY 4.0)",
           "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
           "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
           "<object>/Data/{Images,Masks}/..., split_csv/1cls.csv (copy it from spot-diff if missing)"),
    Source("mpdd", "mpdd", "https://github.com/stepanje/MPDD", layout="MVTec AD layout"),
    Source("btad", "btad", "http://avires.dimi.uniud.it/papers/btad/btad.zip (BTech)",
           layout="01|02|03/{train/ok,test/{ok,ko},ground_truth/ko}"),
    Source("ksdd", "ksdd", "https://www.vicos.si/resources/kolektorsdd/ (KolektorSDD v1)",
           layout="kosNN/PartK.jpg + PartK_label.bmp"),
    Source("dagm", "dagm", "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
           layout="ClassN/{Train,Test}/NNNN.PNG + Label/NNNN_label.PNG"),
    Source("dtd", "dtd", "https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1 (DTD-Synthetic, Aota et al. WACV 2023)",
           layout="MVTec AD layout"),
    Source("headct", "headct", "https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage",
           layout="head_ct/NNN.png + labels.csv"),
    Source("brainmri", "brainmri", "https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
           layout="no/*.jpg, yes/*.jpg"),
    Source("br35h", "br35h", "https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection",
           layout="no/*.jpg, yes/*.jpg"),
    Source("isic", "isic", "https://challenge.isic-archive.com/data/#2016 (ISBI 2016 Part 1)",
           layout="ISBI2016_ISIC_Part1_Test_Data/, ISBI2016_ISIC_Part1_Test_GroundTruth/"),
    Source("colondb", "colondb", "http://vi.cvc.uab.es/colon-qa/cvccolondb/", layout="images/, masks/"),
    Source("clinicdb", "clinicdb", "https://polyp.grand-challenge.org/CVCClinicDB/",
           layout="Original/, Ground Truth/ (or PNG/Original, PNG/Ground Truth)"),
    Source("kvasir", "kvasir", "https://datasets.simula.no/kvasir-seg/", "https://datasets.simula.no/downloads/kvasir-seg.zip",
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
    """Download and extract dataset ``name`` into ``root/<folder>``; resumes; skips when done."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    url = url or src.url
    if not url:
        raise DownloadError(f"{name} has no stable public archive; get it from {src.where} and put it in "
                            f"{Path(root) / src.folder} as: {src.layout}")
    target = Path(root) / src.folder
    done = target / ".adaclip-extracted"
    if done.is_file():
        return target
    archive = download(url, Path(root) / ".downloads" / Path(url).name,
                       src.sha256 if sha256 is None else sha256)
    extract(archive, target)
    if src.archive_root and (target / src.archive_root).is_dir():
        inner = target / src.archive_root
        for item in inner.iterdir():
            os.replace(item, target / item.name)
        inner.rmdir()
    done.write_text(f"{url}\n")
    return target


def sources_table():
    """A pandas table: dataset, folder under the data root, where to get it, expected layout."""
    import pandas as pd

    return pd.DataFrame([dict(dataset=s.name, folder=s.folder, download="auto" if s.url else "manual",
                              where=s.where, layout=s.layout) for s in SOURCES.values()])
