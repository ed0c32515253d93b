"""User-supplied paths and uploaded zips: nothing outside the allow-listed folders is ever read."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import PIL.Image
import pytest

from app_support.archives import UPLOAD_LIMITS, ArchiveError, extract_zip
from app_support.downloads import DownloadFolder
from app_support.paths import PathNotAllowedError, resolve_inside


def png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def coco(file_names: list[str]) -> str:
    return json.dumps(
        {
            "images": [{"id": i, "file_name": name, "width": 32, "height": 24} for i, name in enumerate(file_names)],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [2, 2, 10, 10]}],
            "categories": [{"id": 1, "name": "blob"}],
        }
    )


def make_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# -- allow-listed paths ----------------------------------------------------------------------------------------- #


def test_resolve_inside_accepts_only_paths_within_the_root(tmp_path: Path):
    root = tmp_path / "data"
    (root / "set" / "images").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link-out")
    assert resolve_inside(root, "set") == (root / "set").resolve()
    assert resolve_inside(root, " set/images/ ") == (root / "set" / "images").resolve()
    refused = ["/etc", "~", "~/x", "../secret", "set/../../secret", "link-out", "", "a\x00b", "missing"]
    for text in refused:
        with pytest.raises(PathNotAllowedError):
            resolve_inside(root, text)
    assert resolve_inside(root, "new", must_exist=False) == (root / "new").resolve()


# -- zip extraction --------------------------------------------------------------------------------------------- #


def test_extracts_a_coco_zip_and_uses_its_single_top_folder(tmp_path: Path):
    archive = make_zip(
        tmp_path / "d.zip",
        {
            "set/annotations.json": coco(["a.png"]),
            "set/a.png": png_bytes(),
            "__MACOSX/set/._a.png": b"junk",
            "set/.DS_Store": b"junk",
        },
    )
    root = extract_zip(archive, tmp_path / "uploads")
    assert root.name == "set"
    assert sorted(p.name for p in root.iterdir()) == ["a.png", "annotations.json"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt", "..\\evil.txt"])
def test_zip_slip_names_are_refused(tmp_path: Path, name: str):
    archive = make_zip(tmp_path / "slip.zip", {"ok.txt": "fine", name: "evil"})
    with pytest.raises(ArchiveError, match="unsafe file name"):
        extract_zip(archive, tmp_path / "uploads")
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "uploads").iterdir()) == []  # a refused upload leaves nothing behind


def test_symlink_members_are_not_created(tmp_path: Path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        info = zipfile.ZipInfo("set/passwd")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(info, "/etc/passwd")
        handle.writestr("set/a.png", png_bytes())
    root = extract_zip(archive, tmp_path / "uploads")
    assert not (root / "passwd").exists() and (root / "a.png").is_file()


def test_zip_bombs_and_non_zips_are_refused(tmp_path: Path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 5_000_000})
    with pytest.raises(ArchiveError, match="compressible"):
        extract_zip(bomb, tmp_path / "uploads")
    big = make_zip(tmp_path / "big.zip", {"a.png": png_bytes((300, 300)), "b.png": png_bytes((300, 300))})
    with pytest.raises(ArchiveError, match="more than"):
        extract_zip(big, tmp_path / "uploads", limits=dataclasses.replace(UPLOAD_LIMITS, max_unpacked_bytes=1500))
    many = make_zip(tmp_path / "many.zip", {f"{i}.txt": "x" for i in range(30)})
    with pytest.raises(ArchiveError, match="entries"):
        extract_zip(many, tmp_path / "uploads", limits=dataclasses.replace(UPLOAD_LIMITS, max_members=10))
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ArchiveError, match="not a zip"):
        extract_zip(tmp_path / "fake.zip", tmp_path / "uploads")
    truncated = make_zip(tmp_path / "ok.zip", {"a.png": png_bytes()}).read_bytes()[:-30]
    (tmp_path / "cut.zip").write_bytes(truncated)
    with pytest.raises(ArchiveError):
        extract_zip(tmp_path / "cut.zip", tmp_path / "uploads")
    empty = make_zip(tmp_path / "empty.zip", {"folder/": ""})
    with pytest.raises(ArchiveError, match="no files"):
        extract_zip(empty, tmp_path / "uploads")


def test_download_folder_writes_json_and_loadable_zips(tmp_path: Path):
    downloads = DownloadFolder(tmp_path / "downloads", keep=3)
    first = downloads.write_json([{"score": 0.5}])
    assert json.loads(first.read_text()) == [{"score": 0.5}]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    os.symlink("/etc/passwd", model / "leak")
    archive = downloads.zip_directory(model, "my-model")
    with zipfile.ZipFile(archive) as handle:
        assert sorted(handle.namelist()) == ["my-model/config.json", "my-model/model.safetensors"]
    for _ in range(4):
        downloads.write_json([])
    assert len(list((tmp_path / "downloads").iterdir())) == 3 and not first.exists()
