"""Files on disk: integrity checks for safetensors files (a damaged download fails with a message instead of a parser
error) and atomic writes (a crash leaves the old file or the new one, never half of one)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_files(folder: str | os.PathLike):
    """A staging folder inside `folder`: write files into it; when the block ends without error each one replaces
    its namesake in `folder` by a rename, so a crash never leaves a half-written file behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
