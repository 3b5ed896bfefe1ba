"""Files that survive crashes and say what is wrong with them.

Writes go to a temporary sibling that is flushed to disk and then renamed into place, so a reader sees the old
file or the new one, never half of one. Reads check integrity first, so a damaged file fails with a message that
names it instead of a parser error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .options import is_shape

logger = logging.getLogger("hf_moe_cl")
FIX = "Delete it and save or download it again."
HEX = frozenset("0123456789abcdef")
# Bytes per element of the safetensors dtypes.
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8, "F8_E8M0": 1}


def _fsync_directory(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to `path`, unique per writer."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; flushed and renamed onto `path` when the block succeeds,
    removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a flushed temporary sibling and a rename."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` (and the folders themselves) to disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` whole (flushed, then renamed; an existing
    `path` is moved aside first and deleted after, so a crash leaves the old folder, the new one or, for an instant,
    neither, never a mixture); on failure `path` is untouched. `replace=False` refuses a `path` holding files."""
    path = Path(path)
    if path.is_symlink():  # replacing it would replace the link, not the folder, and write nothing where it points
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); give the folder itself or a new path.")
    if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; choose a new folder or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    temporary.mkdir()
    try:
        yield temporary
        fsync_tree(temporary)
        retired = None
        if path.exists():
            retired = temporary_sibling(path)
            os.replace(path, retired)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
        if retired is not None:
            shutil.rmtree(retired)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def read_json_file(path: str | os.PathLike) -> Any:
    """The parsed JSON in `path`, or a ValueError that names the file."""
    path = os.fspath(path)
    try:
        with open(path) as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        size = os.path.getsize(path)
        raise ValueError(f"{path} is not valid JSON ({size} bytes; {error}). {FIX}") from None


def check_json_file(path: str | os.PathLike) -> None:
    """Raise ValueError if the JSON file at `path` exists but does not parse to an object."""
    if os.path.isfile(path) and not isinstance(read_json_file(path), dict):
        raise ValueError(f"{os.fspath(path)} should hold a JSON object. {FIX}")


def check_safetensors_file(path: str | os.PathLike) -> list[str]:
    """Raise ValueError if `path` is not a complete safetensors file (truncated, empty or not safetensors); returns
    the names of its tensors, read from the header checked."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): a safetensors file starts with an 8-byte header "
                             f"size. {FIX}")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header claims {header_size} bytes "
                             f"but the file has {size}. {FIX}")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a corrupt safetensors header ({error}). {FIX}") from None
    tensors = {k: e for k, e in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or any(not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list)
                              or len(entry["data_offsets"]) != 2 for entry in tensors.values()):
        raise ValueError(f"{path} has a malformed safetensors header (not a table of tensors with data offsets). "
                         f"{FIX}")
    for key, entry in tensors.items():
        shape, (start, end) = entry.get("shape"), entry["data_offsets"]
        width = SAFETENSORS_DTYPE_BYTES.get(entry.get("dtype"))
        if width is None or not is_shape(shape) or not all(isinstance(o, int) and o >= 0 for o in (start, end)) \
                or end - start != math.prod(shape) * width:
            raise ValueError(f"{path} has a malformed safetensors header: tensor {key!r} (dtype {entry.get('dtype')!r}, "
                             f"shape {shape!r}) does not fit its data offsets {entry['data_offsets']!r}. {FIX}")
    data_end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if 8 + header_size + data_end > size:
        raise ValueError(f"{path} is truncated: its tensors need {8 + header_size + data_end} bytes but the file has "
                         f"{size}. {FIX}")
    return list(tensors)


@contextmanager
def atomic_files(folder: str | os.PathLike, replaces: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder inside `folder`: write files into it; when the block ends without error each one is flushed
    and replaces its namesake in `folder` by a rename, so a crash never leaves a half-written file behind. Files
    `folder` holds besides them stay, but those named in `replaces` that the block did not write are removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".files.tmp-", dir=folder))
    try:
        yield staging
        fsync_tree(staging)
        written = sorted(staging.iterdir())
        for path in written:
            os.replace(path, folder / path.name)
        for name in set(replaces) - {path.name for path in written}:
            (folder / name).unlink(missing_ok=True)
        _fsync_directory(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----- integrity: the sha256 of every file a save wrote, checked where it is read back ------------------------------
def file_hashes(folder: str | os.PathLike, names=None) -> dict[str, str]:
    """{path relative to `folder`: sha256} of `names` (default: every file under `folder`)."""
    folder = Path(folder)
    paths = [folder / name for name in names] if names is not None else sorted(p for p in folder.rglob("*")
                                                                                 if p.is_file())
    hashes = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def json_sha256(value: Any) -> str:
    """sha256 of `value` as JSON with sorted keys: a record of saved values that no file hash covers."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


_UNRECORDED: set = set()


def check_file_hashes(folder: str | os.PathLike, record: Any, where: str, fix: str) -> None:
    """Refuse a file of `folder` whose bytes are not those the save recorded in `record` ({name: sha256}, kept in
    `where`), naming it and `fix`; a save without a record (older releases) is read with one warning per folder."""
    folder = Path(folder)
    if record is None:
        if folder.resolve() not in _UNRECORDED:
            _UNRECORDED.add(folder.resolve())
            logger.warning("%s records no sha256 of its files (saved by hf-moe-cl <= 0.3): damaged files cannot be "
                           "told apart; save it again to add the record.", where)
        return
    if not isinstance(record, dict) or not all(isinstance(h, str) and len(h) == 64 and set(h) <= HEX
                                               and isinstance(n, str) for n, h in record.items()):
        raise ValueError(f"The sha256 record in {where} is damaged or was edited (not a map of file names to 64 hex "
                         f"digits). {fix}")
    for name, recorded in record.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            raise ValueError(f"{folder / name} is missing: {where} records it. {fix}")
        if file_hashes(folder, [name])[name] != recorded:
            raise ValueError(f"{path} is not the file that was saved: its sha256 differs from the one {where} "
                             f"records (damaged, or replaced by another file). {fix}")
