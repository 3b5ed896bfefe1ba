"""Files that are whole or absent: safetensors integrity checks (a damaged download fails with a message instead of
a parser error) and atomic writes (an interrupted run never leaves a half-written report or card)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ValueError if `path` is not a complete safetensors file (truncated, empty or not safetensors)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    fix = "Delete it and save or download it again."
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): a safetensors file starts with an 8-byte header size. {fix}")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {header_size} bytes but the file "
                f"has {size}. {fix}"
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a corrupt safetensors header ({error}). {fix}") from None
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + data_end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {8 + header_size + data_end} bytes but the file has {size}. {fix}"
        )


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; renamed to `path` when the block succeeds, removed if it fails.
    `path` must not exist or be an empty folder: a folder of other files is never replaced."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; choose a new folder or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path)
    temporary.mkdir()
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
