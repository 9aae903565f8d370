"""Inputs through fsspec (local paths and s3://): listing, deterministic planning into partitions, and
reading one partition's records.

A record is a plain dict: ``source_uri``, ``task``, ``caption``, ``system``/``question``/``answer`` for QA,
and per media slot (``target``, ``source``) either the bytes (``<slot>_bytes``) or a URI to fetch
(``<slot>_uri``), with a name that carries the extension (``<slot>_name``).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from .config import PrecomputeConfig, StorageConfig

# StorageError, filesystem and with_retries are also imported from here by the writer and the pipeline.
from .storage import StorageError, filesystem, open_input, path_exists, with_retries  # noqa: F401

MEDIA_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
TAR_COMPRESSION = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tbz2": "bz2",
                   ".tbz": "bz2", ".tar.xz": "xz", ".txz": "xz"}
"""WebDataset names and the compression each declares: a tar is decompressed only when its name says so."""
INPUT_EXTENSIONS = {**dict.fromkeys(TAR_COMPRESSION, "webdataset"), ".parquet": "parquet", ".jsonl": "jsonl",
                    ".json": "jsonl", ".csv": "csv"}
COMPRESSION_MAGIC = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str
    records: int


def _format_of(uri: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    for ext, fmt in INPUT_EXTENSIONS.items():
        if uri.lower().endswith(ext):
            return fmt
    return None


def _join(protocol_uri: str, path: str) -> str:
    return f"{protocol_uri.split('://', 1)[0]}://{path}" if "://" in protocol_uri else path


def list_inputs(cfg: PrecomputeConfig) -> list[InputFile]:
    """Input files in sorted order with their record counts (the basis of a deterministic plan)."""
    if not cfg.input:
        raise ValueError("input: no input URI given (--input or input: in the config)")
    fs = filesystem(cfg.input, cfg.storage)
    if not with_retries(f"listing {cfg.input}", cfg.storage, lambda: path_exists(fs, cfg.input)):
        raise FileNotFoundError(f"input {cfg.input!r} does not exist")
    if with_retries(f"listing {cfg.input}", cfg.storage, lambda: fs.isdir(cfg.input)):
        paths = sorted(with_retries(f"listing {cfg.input}", cfg.storage, lambda: fs.find(cfg.input)))
        uris = [_join(cfg.input, p) for p in paths]
    else:
        uris = [cfg.input]
    files = []
    for uri in uris:
        fmt = _format_of(uri, cfg.input_format)
        if fmt is None:
            continue
        count = with_retries(f"reading {uri}", cfg.storage, lambda: count_records(uri, fmt, cfg.storage))
        files.append(InputFile(uri, fmt, count))
    if not files:
        raise ValueError(f"input {cfg.input!r} holds no .tar, .parquet, .jsonl or .csv files")
    return files


def count_records(uri: str, fmt: str, storage: StorageConfig) -> int:
    with open_input(uri, storage) as fh:
        if fmt == "parquet":
            return pq.ParquetFile(fh).metadata.num_rows
        if fmt == "webdataset":
            return 1 if _tar_problem(fh, uri) else len(_tar_keys(fh, uri))
        if fmt == "jsonl":
            return sum(1 for line in fh if line.strip())
        return sum(1 for _ in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", errors="replace")))


def _tar_declared(uri: str) -> str:
    """The compression the name of a tar declares ("" for a plain .tar)."""
    lower = uri.lower()
    return next((kind for ext, kind in TAR_COMPRESSION.items() if ext != ".tar" and lower.endswith(ext)), "")


def _tar_problem(fh, uri: str) -> str | None:
    """Why a tar is refused, or None: a compressed stream under a plain .tar name (read as a stream it
    expands without bound: 2.2 MB of gzip named .tar held 2 GiB), or a name that declares another compression
    than the bytes have. A refused tar counts as one record, quarantined with this message."""
    declared = _tar_declared(uri)
    head = fh.read(8)
    fh.seek(0)
    found = next((kind for kind, magic in COMPRESSION_MAGIC.items() if head.startswith(magic)), "")
    if found == declared:
        return None
    if not declared:
        names = ", ".join(ext for ext, kind in TAR_COMPRESSION.items() if kind == found) or "not supported"
        return f"{uri}: a {found} stream named .tar; a compressed tar is read only under its name ({names})"
    actual = f"a {found} stream" if found else "not compressed"
    return f"{uri}: named as a {declared} tar, but the bytes are {actual}"


def _open_tar(fh, uri: str) -> tarfile.TarFile:
    """A plain .tar is read with random access (a skipped member is seeked over, never read); a compressed
    one as a stream of the compression its name declares (never ``r|*``, which guesses)."""
    declared = _tar_declared(uri)
    return tarfile.open(fileobj=fh, mode=f"r|{declared}" if declared else "r:")


def _tar_keys(fh, uri: str) -> list[str]:
    keys: list[str] = []
    with _open_tar(fh, uri) as tar:
        for member in tar:
            if member.isfile():
                key = member.name.rsplit(".", 1)[0] if "." in member.name.rsplit("/", 1)[-1] else member.name
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def plan_partitions(files: list[InputFile], partition_size: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenated records into partitions of ``partition_size``: lists of (file, start, stop)."""
    partitions: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = partition_size
    for index, file in enumerate(files):
        start = 0
        while start < file.records:
            take = min(room, file.records - start)
            current.append((index, start, start + take))
            start += take
            room -= take
            if room == 0:
                partitions.append(current)
                current, room = [], partition_size
    if current:
        partitions.append(current)
    return partitions


# ------------------------------------------------------------------------------------------------ reading


def read_segment(file: InputFile, start: int, stop: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    opener = lambda: open_input(file.uri, cfg.storage)  # noqa: E731
    if file.format == "parquet":
        yield from _parquet_records(opener, file.uri, start, stop, cfg)
    elif file.format == "webdataset":
        yield from _tar_records(opener, file.uri, start, stop, cfg)
    elif file.format == "jsonl":
        with opener() as fh:
            rows = (line for line in fh if line.strip())
            for index, line in enumerate(rows):
                if index >= stop:
                    break
                if index >= start:
                    yield _guarded(f"{file.uri}#{index}", _manifest_record,
                                   _json_or_error(line, f"{file.uri}#{index}"), file.uri, index, cfg)
    else:
        with opener() as fh:
            reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", errors="replace"))
            for index, row in enumerate(reader):
                if index >= stop:
                    break
                if index >= start:
                    yield _guarded(f"{file.uri}#{index}", _manifest_record, row, file.uri, index, cfg)


def _guarded(source_uri: str, build, *args) -> dict:
    """``build(*args)``: one input record as a dict; a record whose values have the wrong types (a number
    where a URI belongs, text where bytes belong) becomes an error record, quarantined downstream."""
    try:
        return build(*args)
    except Exception as err:  # noqa: BLE001 - whatever one malformed record raises stays with that record
        return {"source_uri": source_uri, "error": f"{source_uri}: {type(err).__name__}: {err}"}


def _expect(value, kinds: tuple[type, ...], what: str):
    if value is not None and not isinstance(value, kinds):
        raise TypeError(f"{what} is {type(value).__name__}, expected {' or '.join(k.__name__ for k in kinds)}")
    return value


def _json_or_error(line: bytes, where: str) -> dict:
    try:
        value = json.loads(line)
        return value if isinstance(value, dict) else {"__error__": f"{where}: a JSON object per line expected"}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {"__error__": f"{where}: {err}"}


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "\0invalid-utf8"
    return str(value)


def _default_task(name: str, cfg: PrecomputeConfig) -> str:
    from .decode import media_kind

    return cfg.task or ("t2v" if media_kind(name, b"") == "video" else "t2i")


def _manifest_record(row: dict, file_uri: str, index: int, cfg: PrecomputeConfig) -> dict:
    source_uri = f"{file_uri}#{index}"
    if "__error__" in row:
        return {"source_uri": source_uri, "error": row["__error__"]}
    from lance_core.packing import TASKS

    media = row.get("uri") or row.get("image") or row.get("video") or row.get("media_uri") or ""
    _expect(media, (str,), "the media URI")
    _expect(row.get("source"), (str,), "the source media URI")
    task = _expect(row.get("task"), (str,), "task") or _default_task(media, cfg)
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    record = {
        "source_uri": source_uri, "task": task,
        "caption": _text(row.get("caption")), "system": _text(row.get("system")),
        "question": _text(row.get("question")), "answer": _text(row.get("answer")),
        "target_uri": _resolve(media, file_uri), "target_name": media,
    }
    if row.get("source"):
        record["source_uri_media"] = _resolve(row["source"], file_uri)
        record["source_name"] = row["source"]
    return record


def _resolve(media: str, manifest_uri: str) -> str:
    if not media or "://" in media or media.startswith("/"):
        return media
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    return f"{base}/{media}"


RELEASE_LAYOUTS = (  # (columns present, task, target column, source column)
    ({"input_image_bytes", "output_image_bytes"}, "i2i", "output_image_bytes", "input_image_bytes"),
    ({"input_video_bytes", "output_video_bytes"}, "v2v", "output_video_bytes", "input_video_bytes"),
    ({"image_bytes", "caption_a"}, "i2t", "image_bytes", None),
    ({"video_bytes", "caption_a"}, "v2t", "video_bytes", None),
    ({"image_bytes"}, "t2i", "image_bytes", None),
    ({"video_bytes"}, "t2v", "video_bytes", None),
)


def _parquet_records(opener, uri: str, start: int, stop: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    with opener() as fh:
        pf = pq.ParquetFile(fh)
        columns = set(pf.schema_arrow.names)
        layout = next((entry for entry in RELEASE_LAYOUTS if entry[0] <= columns), None)
        offset = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if offset + rows <= start or offset >= stop:
                offset += rows
                continue
            table = pf.read_row_group(group)
            for local, row in enumerate(table.to_pylist()):
                index = offset + local
                if start <= index < stop:
                    yield (_guarded(f"{uri}#{index}", _release_record, row, layout, uri, index) if layout
                           else _guarded(f"{uri}#{index}", _manifest_record, row, uri, index, cfg))
            offset += rows


def _release_record(row: dict, layout, uri: str, index: int) -> dict:
    _, task, target_col, source_col = layout
    for column in (target_col, source_col):
        if column:
            _expect(row.get(column), (bytes,), f"column {column}")
    ext = ".mp4" if "video" in target_col else ".jpg"
    record = {
        "source_uri": f"{uri}#{index}", "task": task, "target_bytes": row.get(target_col) or b"",
        "target_name": f"{index}{ext}",
        "caption": _text(row.get("caption")) if task not in ("i2t", "v2t") else _text(row.get("caption_a")),
    }
    if task in ("i2t", "v2t"):
        record.update(system=_text(row.get("caption_i")), question=_text(row.get("caption_q")) or "",
                      answer=_text(row.get("caption_a")))
    if source_col:
        record.update(source_bytes=row.get(source_col) or b"", source_name=f"{index}-source{ext}")
    return record


def _tar_records(opener, uri: str, start: int, stop: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    with opener() as fh:
        problem = _tar_problem(fh, uri)
        if problem:
            if start <= 0 < stop:
                yield {"source_uri": uri, "error": problem, "error_reason": "tar_compression"}
            return
        with _open_tar(fh, uri) as tar:
            yield from _tar_samples(tar, uri, start, stop, cfg)


def _tar_samples(tar: tarfile.TarFile, uri: str, start: int, stop: int,
                 cfg: PrecomputeConfig) -> Iterator[dict]:
    cap = int(cfg.max_tar_member_mb * 2**20)
    index, key, parts, oversize = -1, None, {}, {}
    for member in tar:
        if not member.isfile():
            continue
        name = member.name
        member_key, _, ext = name.rpartition(".") if "." in name.rsplit("/", 1)[-1] else (name, "", "")
        if member_key != key:
            if key is not None and start <= index < stop:
                yield _tar_sample(key, parts, oversize, uri, index, cfg)
            index += 1
            key, parts, oversize = member_key, {}, {}
            if index >= stop:
                return
        if start <= index < stop:
            if member.size > cap:
                oversize[name] = member.size
            else:
                parts[ext.lower()] = tar.extractfile(member).read()
    if key is not None and start <= index < stop:
        yield _tar_sample(key, parts, oversize, uri, index, cfg)


def _tar_sample(key: str, parts: dict[str, bytes], oversize: dict[str, int], uri: str, index: int,
                cfg: PrecomputeConfig) -> dict:
    if oversize:
        sizes = ", ".join(f"{name} is {size} bytes" for name, size in oversize.items())
        return {"source_uri": f"{uri}#{key}", "error_reason": "member_too_large",
                "error": f"{uri}#{key}: {sizes}, above max_tar_member_mb ({cfg.max_tar_member_mb:g} MiB)"}
    return _guarded(f"{uri}#{key}", _wds_record, key, parts, uri, index, cfg)


def _wds_record(key: str, parts: dict[str, bytes], uri: str, index: int, cfg: PrecomputeConfig) -> dict:
    media_ext = next((e for e in parts if "." + e in MEDIA_EXTENSIONS), None)
    caption = None
    if "txt" in parts:
        caption = _text(parts["txt"])
    elif "json" in parts:
        meta = _json_or_error(parts["json"], f"{uri}#{key}")
        caption = _text(meta.get("caption"))
    name = f"{key}.{media_ext}" if media_ext else key
    return {"source_uri": f"{uri}#{key}", "task": _default_task(name, cfg), "caption": caption,
            "target_bytes": parts.get(media_ext, b"") if media_ext else b"", "target_name": name,
            **({} if media_ext else {"error": f"{uri}#{key}: no media file in the sample"})}


def fetch_bytes(uri: str, storage: StorageConfig) -> bytes:
    fs = filesystem(uri, storage)
    return with_retries(f"reading {uri}", storage, lambda: fs.cat_file(uri))
