"""Inputs through fsspec (local paths and s3://): listing, deterministic planning into partitions, and
reading one partition's records.

A record is a plain dict: ``source_uri``, ``task``, ``caption``, ``system``/``question``/``answer`` for QA,
and per media slot (``target``; ``source`` of edits; ``ref_0``... of subject-driven rows) either the bytes
(``<slot>_bytes``) or a URI to fetch (``<slot>_uri``, the source's ``source_uri_media``), with a name that
carries the extension (``<slot>_name``), and ``media``: the media it names (URL, path, tar member or Parquet
column) for the lists of dropped records. A record the source itself marks as failed (img2dataset's
``status``) carries ``filtered_reason``; a malformed one carries ``error``.

Layouts read:
- WebDataset tars, split by the WebDataset convention: a member's key is its path up to the first dot of
  its basename, the rest is the field (``s7.image.jpg`` + ``s7.caption.txt`` = one sample with fields
  ``image.jpg`` and ``caption.txt``); a field's role comes from its last suffix (see :func:`_pick_field`).
  Fields ``ref_0.jpg``, ``ref_1.jpg``... are the references of a subject-driven sample.
- img2dataset / video2dataset output folders (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``):
  the tars are read; the per-shard metadata Parquet and ``_stats.json`` beside a tar are not inputs.
- Parquet in the Lance release layouts (:data:`RELEASE_LAYOUTS`).
- JSONL / CSV / Parquet manifests of media URIs and captions, columns named by ``manifest:`` of the config. A
  media cell is a URI, the media's bytes, or a Hugging Face ``datasets`` Image struct ``{bytes, path}`` (so a
  ``datasets`` Parquet file, ``image`` + ``text``, is read as it is); reference columns (``ref_0``...) make
  subject-driven rows.
- Folders of media files with same-name ``.txt`` captions (``a/cat.jpg`` + ``a/cat.txt``): each media file is
  one sample (see :func:`media_inputs`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from pipelines.runtime.storage import (
    StorageConfig,
    fetch_bytes,
    filesystem,
    open_input,
    path_exists,
    with_protocol,
    with_retries,
)

from .config import ManifestConfig, PrecomputeConfig
from .media import REFERENCE_SLOTS, uri_key

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_SUFFIXES = ("mp4", "mov", "webm", "mkv", "avi", "m4v")
MEDIA_EXTENSIONS = tuple(f".{suffix}" for suffix in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
VIDEO_TASKS = ("t2v", "i2v", "v2v", "v2t")
WDS_ROLES = {  # role: (last suffixes of its fields, first parts that name the role in a multi-part field)
    "media": (IMAGE_SUFFIXES + VIDEO_SUFFIXES, ("image", "img", "video", "vid", "media", "target")),
    "caption": (("txt", "text", "caption"), ("caption", "captions", "txt", "text", "prompt")),
    "json": (("json",), ("meta", "metadata", "info")),
}
"""How a WebDataset field is recognised: by its last suffix (``image.jpg`` is media, ``caption.txt`` text)."""
FAILED_STATUS = ("fail", "error")
"""A per-sample JSON ``status`` starting with one of these marks a sample its source did not get (img2dataset:
``failed_to_download``, ``failed_to_resize``; video2dataset: ``failed_to_subsample``): filtered, not read."""
TAR_COMPRESSION = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tbz2": "bz2",
                   ".tbz": "bz2", ".tar.xz": "xz", ".txz": "xz"}
"""WebDataset names and the compression each declares: a tar is decompressed only when its name says so."""
INPUT_EXTENSIONS = {**dict.fromkeys(TAR_COMPRESSION, "webdataset"), ".parquet": "parquet", ".jsonl": "jsonl",
                    ".json": "jsonl", ".csv": "csv"}
REFERENCE_FIELD = re.compile(r"ref_\d+")
"""The first part of a WebDataset field holding a reference of a subject-driven sample (``ref_0.jpg``)."""
COMPRESSION_MAGIC = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str
    records: int


def _format_of(uri: str, configured: str) -> str | None:
    if configured == "media":
        return "media" if _is_media(uri) else None
    if configured != "auto":
        return configured
    for ext, fmt in INPUT_EXTENSIONS.items():
        if uri.lower().endswith(ext):
            return fmt
    return None


def list_input_files(cfg: PrecomputeConfig) -> list[tuple[str, str]]:
    """(URI, format) of the input files in sorted order, from the listing alone (no file is opened)."""
    if not cfg.input:
        raise ValueError("input: no input URI given (--input or input: in the config)")
    fs = filesystem(cfg.input, cfg.storage)
    if not with_retries(f"listing {cfg.input}", cfg.storage, lambda: path_exists(fs, cfg.input)):
        raise FileNotFoundError(f"input {cfg.input!r} does not exist")
    if with_retries(f"listing {cfg.input}", cfg.storage, lambda: fs.isdir(cfg.input)):
        paths = sorted(with_retries(f"listing {cfg.input}", cfg.storage, lambda: fs.find(cfg.input)))
        uris = [with_protocol(cfg.input, p) for p in skip_tar_sidecars(paths)]
    else:
        uris = [cfg.input]
    formats = {uri: _format_of(uri, cfg.input_format) for uri in uris}
    if cfg.input_format == "auto":
        formats.update(dict.fromkeys(media_inputs(uris, alone=not any(formats.values())), "media"))
    files = [(uri, fmt) for uri, fmt in formats.items() if fmt is not None]
    if not files:
        raise ValueError(f"input {cfg.input!r} holds no .tar, .parquet, .jsonl, .csv or media files")
    return files


def _is_media(uri: str) -> bool:
    return uri.lower().endswith(MEDIA_EXTENSIONS)


def caption_beside(uri: str) -> str:
    """The caption file of a media file: the same name with ``.txt`` for its extension."""
    return uri[: uri.rfind(".")] + ".txt"


def media_inputs(uris: list[str], alone: bool) -> list[str]:
    """The media files of a listing that are samples by themselves (input format ``media``): those with a
    caption beside them (:func:`caption_beside`), or every one when the listing holds no other input (a
    folder of media alone, where one without a caption is filtered as such). A media file without a caption
    beside other inputs is not one: manifests name their media in folders beside them."""
    present = set(uris)
    return [uri for uri in uris if _is_media(uri) and (alone or caption_beside(uri) in present)]


def count_batch(files: list[tuple[str, str]], storage: StorageConfig, manifest: ManifestConfig) -> list[int]:
    """Record counts of a batch of (URI, format), in order: the work of one planning task."""
    return [with_retries(f"reading {uri}", storage,
                         lambda uri=uri, fmt=fmt: count_records(uri, fmt, storage, manifest))
            for uri, fmt in files]


def list_inputs(cfg: PrecomputeConfig) -> list[InputFile]:
    """Input files in sorted order with their record counts, counted one after another in this process (small
    inputs: tests and benches; the precompute counts in Ray tasks, see pipelines/data/plan.py)."""
    files = list_input_files(cfg)
    counts = count_batch(files, cfg.storage, cfg.manifest)
    return [InputFile(uri, fmt, count) for (uri, fmt), count in zip(files, counts)]


def skip_tar_sidecars(paths: list[str]) -> list[str]:
    """``paths`` without the per-shard metadata img2dataset and video2dataset write beside each tar
    (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``): the samples are in the tar; the Parquet
    repeats their metadata (and lists the failed ones) and the stats are one JSON document, not JSONL.
    ``_stats.json`` is also skipped beside a Parquet of the same name (img2dataset's parquet output)."""
    stems = set()
    for path in paths:
        lower = path.lower()
        ext = next((ext for ext in TAR_COMPRESSION if lower.endswith(ext)), None)
        if ext is not None:
            stems.add(path[: -len(ext)])
    shards = stems | {path[: -len(".parquet")] for path in paths if path.lower().endswith(".parquet")}
    return [path for path in paths
            if not (path.lower().endswith(".parquet") and path[: -len(".parquet")] in stems)
            and not (path.endswith("_stats.json") and path[: -len("_stats.json")] in shards)]


def count_records(uri: str, fmt: str, storage: StorageConfig, manifest: ManifestConfig | None = None) -> int:
    manifest = manifest or ManifestConfig()
    if fmt == "media":
        return 1
    with open_input(uri, storage) as fh:
        if fmt == "parquet":
            pf = pq.ParquetFile(fh)
            _check_manifest_columns(pf.schema_arrow.names, uri, manifest, release_layout(pf.schema_arrow.names))
            return pf.metadata.num_rows
        if fmt == "webdataset":
            return 1 if _tar_problem(fh, uri) else _tar_sample_count(fh, uri)
        if fmt == "jsonl":
            return sum(1 for line in fh if line.strip())
        reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", errors="replace"))
        _check_manifest_columns(reader.fieldnames or [], uri, manifest)
        return sum(1 for _ in reader)


def _check_manifest_columns(columns: list[str], uri: str, manifest: ManifestConfig, layout=None) -> None:
    """A CSV or Parquet manifest must hold one of the media URI columns and one of the caption columns (or an
    answer column: QA rows), a Parquet of a release layout with a caption one of the caption columns: the
    header says so up front. JSONL rows may differ; a row without a URI is quarantined by itself, one without
    a caption filtered."""
    has = ", ".join(columns) or "no columns"
    if layout is None and not set(manifest.uri_column) & set(columns):
        raise ValueError(f"{uri}: no media URI column; manifest.uri_column names {', '.join(manifest.uri_column)}"
                         f", the file has {has}")
    qa = layout[1] in ("i2t", "v2t") if layout else bool(set(manifest.answer_column) & set(columns))
    if not qa and not set(manifest.caption_column) & set(columns):
        raise ValueError(f"{uri}: no caption column; manifest.caption_column names "
                         f"{', '.join(manifest.caption_column)}, the file has {has}")


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


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member by the WebDataset convention: the key is the member's path up to the first
    dot of its basename (folders belong to the key), the field is the rest, lower-cased:
    ``shard/s7.image.JPG`` -> ``("shard/s7", "image.jpg")``. None for a member that has no field (no dot in
    its basename, or one that starts with a dot, as macOS's ``._s7.jpg``): WebDataset readers skip those."""
    folder, slash, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    if not stem or not field:
        return None
    return f"{folder}{slash}{stem}", field.lower()


def _tar_sample_count(fh, uri: str) -> int:
    """Samples of a tar: runs of consecutive members of one key. Only the headers are read; a plain tar's
    member data is seeked over."""
    count, key = 0, None
    with _open_tar(fh, uri) as tar:
        for member in tar:
            split = split_member_name(member.name) if member.isfile() else None
            if split is not None and split[0] != key:
                count, key = count + 1, split[0]
    return count


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
    elif file.format == "media":
        if start <= 0 < stop:
            caption = read_caption(caption_beside(file.uri), cfg.storage)
            yield _guarded(file.uri, _media_file_record, file.uri, caption, cfg)
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
    """A text field of an input record (caption, system, question, answer) as the shards store it: leading
    and trailing whitespace stripped, as the release does (a caption file's final newline would otherwise be
    one more token); bytes that are not UTF-8 become a marker the record is quarantined by."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "\0invalid-utf8"
    return str(value).strip()


def _default_task(name: str, cfg: PrecomputeConfig, data: bytes = b"") -> str:
    from .decode import media_kind

    return cfg.task or ("t2v" if media_kind(name, data) == "video" else "t2i")


def read_caption(uri: str, storage: StorageConfig) -> bytes | None:
    """The bytes of a caption file, None when there is none (the sample is then filtered as uncaptioned)."""
    try:
        return fetch_bytes(uri, storage)
    except FileNotFoundError:
        return None


def _media_file_record(uri: str, caption: bytes | None, cfg: PrecomputeConfig) -> dict:
    """One media file of a folder with its ``.txt`` caption: the media is fetched when the record is read."""
    return {"source_uri": uri, "task": _default_task(uri, cfg), "caption": _text(caption), "target_uri": uri,
            "target_name": uri.rsplit("/", 1)[-1], "media": uri}


def describe_media(names: dict[str, str]) -> str:
    """The ``media`` of a record from its slots' media (slot -> name): the target's, then ``slot=name``."""
    parts = [names.get("target", "")]
    parts += [f"{slot}={name}" for slot, name in names.items() if slot != "target" and name]
    return "; ".join(parts) if len(parts) > 1 else parts[0]


def _media_cell(value, slot: str, column: str, file_uri: str) -> tuple[dict, str]:
    """A manifest cell naming a slot's media -> (the record's fields of the slot, the media's name).

    A cell is a URI (relative to the manifest, absolute, s3://, https://...), the media's bytes (a Parquet
    binary column; named by the column), or a Hugging Face ``datasets`` Image struct ``{bytes, path}``: its
    bytes, or, when they are null, the file at ``path`` (relative to the Parquet file, as ``datasets`` writes
    files it did not embed)."""
    if isinstance(value, dict):
        data = _expect(value.get("bytes"), (bytes,), f"column {column}: bytes")
        path = _expect(value.get("path"), (str,), f"column {column}: path")
        if data or not path:
            return {f"{slot}_bytes": data or b"", f"{slot}_name": path or ""}, path or column
        value = path
    if isinstance(value, bytes):
        return {f"{slot}_bytes": value, f"{slot}_name": ""}, column
    media = _expect(value, (str,), "the media URI" if slot == "target" else f"the {slot} media URI") or ""
    uri = _resolve(media, file_uri)
    return {uri_key(slot): uri, f"{slot}_name": media}, uri


def _manifest_record(row: dict, file_uri: str, index: int, cfg: PrecomputeConfig) -> dict:
    source_uri = f"{file_uri}#{index}"
    if "__error__" in row:
        return {"source_uri": source_uri, "error": row["__error__"]}
    from lance_core.packing import TASKS

    columns = cfg.manifest
    slots = {"target": _named_column(row, columns.uri_column)}
    source = _named_column(row, columns.source_column)
    if source[1] not in (None, ""):
        slots["source"] = source
    references = [(name, row[name]) for name in columns.reference_columns if row.get(name) not in (None, "")]
    if len(references) > len(REFERENCE_SLOTS):
        raise ValueError(f"{len(references)} references; a row holds at most {len(REFERENCE_SLOTS)}")
    slots.update(zip(REFERENCE_SLOTS, references))
    record = {"source_uri": source_uri}
    names = {}
    for slot, (column, value) in slots.items():
        fields, names[slot] = _media_cell(value, slot, column or columns.uri_column[0], file_uri)
        record.update(fields)
    named_task = _expect(_column(row, columns.task_column), (str,), "task")
    task = named_task or ("subject" if references else
                          _default_task(record["target_name"], cfg, record.get("target_bytes", b"")))
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    record.update({
        "task": task, "media": describe_media(names),
        "caption": _text(_column(row, columns.caption_column)), "system": _text(_column(row, columns.system_column)),
        "question": _text(_column(row, columns.question_column)),
        "answer": _text(_column(row, columns.answer_column)),
    })
    return record


def _column(row: dict, names: tuple[str, ...]):
    """The value of the first of ``names`` that the row holds non-empty; else that of the first it holds at
    all (an empty string stays an empty string); else None."""
    return _named_column(row, names)[1]


def _named_column(row: dict, names: tuple[str, ...]) -> tuple[str | None, object]:
    """(column, value) of :func:`_column`; (None, None) when the row holds none of ``names``."""
    present = [(name, row[name]) for name in names if name in row]
    fallback = present[0] if present else (None, None)
    return next((item for item in present if item[1] not in (None, "")), fallback)


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


def release_layout(columns) -> tuple | None:
    """The entry of :data:`RELEASE_LAYOUTS` a Parquet file with these columns is read as (None: a manifest)."""
    return next((entry for entry in RELEASE_LAYOUTS if entry[0] <= set(columns)), None)


def _parquet_records(opener, uri: str, start: int, stop: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    with opener() as fh:
        pf = pq.ParquetFile(fh)
        layout = release_layout(pf.schema_arrow.names)
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
                    yield (_guarded(f"{uri}#{index}", _release_record, row, layout, uri, index, cfg.manifest)
                           if layout
                           else _guarded(f"{uri}#{index}", _manifest_record, row, uri, index, cfg))
            offset += rows


def _release_record(row: dict, layout, uri: str, index: int, manifest: ManifestConfig | None = None) -> dict:
    _, task, target_col, source_col = layout
    caption_columns = (manifest or ManifestConfig()).caption_column
    for column in (target_col, source_col):
        if column:
            _expect(row.get(column), (bytes,), f"column {column}")
    ext = ".mp4" if "video" in target_col else ".jpg"
    record = {
        "source_uri": f"{uri}#{index}", "task": task, "target_bytes": row.get(target_col) or b"",
        "target_name": f"{index}{ext}",
        "caption": _text(_column(row, caption_columns)) if task not in ("i2t", "v2t") else _text(row.get("caption_a")),
        "media": describe_media({"target": target_col, "source": source_col or ""}),
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
        split = split_member_name(name)
        if split is None:
            continue
        member_key, field = split
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
                parts[field] = tar.extractfile(member).read()
    if key is not None and start <= index < stop:
        yield _tar_sample(key, parts, oversize, uri, index, cfg)


def _tar_sample(key: str, parts: dict[str, bytes], oversize: dict[str, int], uri: str, index: int,
                cfg: PrecomputeConfig) -> dict:
    if oversize:
        sizes = ", ".join(f"{name} is {size} bytes" for name, size in oversize.items())
        return {"source_uri": f"{uri}#{key}", "error_reason": "member_too_large",
                "error": f"{uri}#{key}: {sizes}, above max_tar_member_mb ({cfg.max_tar_member_mb:g} MiB)"}
    return _guarded(f"{uri}#{key}", _wds_record, key, parts, uri, index, cfg)


def _pick_field(parts: dict[str, bytes], role: str, prefer: tuple[str, ...] = ()) -> str | None:
    """The field of a WebDataset sample that fills ``role`` (media, caption, json; see :data:`WDS_ROLES`).

    Candidates are the fields whose last suffix belongs to the role. Precedence: a field of a ``prefer``red
    suffix (the media kind the configured task needs: a t2v run takes ``mp4`` over a ``jpg`` thumbnail), then
    a bare field (``jpg``, ``txt``, ``json``), then one whose first part names the role (``image.jpg``,
    ``caption.txt``, ``meta.json``), then any other (``mask.png``, ``ocr.txt``); ties go to tar order.
    """
    suffixes, names = WDS_ROLES[role]

    def rank(item: tuple[int, str]) -> tuple[bool, int, int]:
        position, field = item
        pieces = field.split(".")
        naming = 0 if len(pieces) == 1 else 1 if pieces[0] in names else 2
        return bool(prefer) and pieces[-1] not in prefer, naming, position

    candidates = [(position, field) for position, field in enumerate(parts) if field.rsplit(".", 1)[-1] in suffixes]
    return min(candidates, key=rank)[1] if candidates else None


def _failed_status(meta: dict) -> str | None:
    """The filter reason of a sample whose metadata says its source failed to get it, else None."""
    status = meta.get("status")
    if not isinstance(status, str) or not status.strip().lower().startswith(FAILED_STATUS):
        return None
    return "status_" + (re.sub(r"[^0-9a-z]+", "_", status.strip().lower()).strip("_")[:60] or "failed")


def _reference_fields(parts: dict[str, bytes]) -> list[str]:
    """The fields of a WebDataset sample that hold references of a subject-driven sample (``ref_0.jpg``,
    ``ref_1.png``...), in the order of their numbers."""
    fields = [field for field in parts if field.rsplit(".", 1)[-1] in WDS_ROLES["media"][0]
              and REFERENCE_FIELD.fullmatch(field.split(".", 1)[0])]
    return sorted(fields, key=lambda field: int(field.split(".", 1)[0][len("ref_"):]))


def _wds_record(key: str, parts: dict[str, bytes], uri: str, index: int, cfg: PrecomputeConfig) -> dict:
    """One WebDataset sample: media, caption (a text field, else ``caption`` of the JSON metadata) and the
    JSON's ``status`` (img2dataset / video2dataset: a failed sample is filtered with its status). Reference
    fields (``ref_0.jpg``...) make it a subject-driven sample. Its ``media`` is the JSON's ``url`` (where
    img2dataset got it) when there is one, else the media member."""
    where = f"{uri}#{key}"
    prefer = (VIDEO_SUFFIXES if cfg.task in VIDEO_TASKS else IMAGE_SUFFIXES) if cfg.task else ()
    references = _reference_fields(parts)
    if len(references) > len(REFERENCE_SLOTS):
        raise ValueError(f"{len(references)} references ({', '.join(references)}); a sample holds at most "
                         f"{len(REFERENCE_SLOTS)}")
    media_field = _pick_field({f: v for f, v in parts.items() if f not in references}, "media", prefer)
    text_field, json_field = _pick_field(parts, "caption"), _pick_field(parts, "json")
    meta = _json_or_error(parts[json_field], where) if json_field else {}
    caption = _text(parts[text_field]) if text_field else _text(meta.get("caption"))
    name = f"{key}.{media_field}" if media_field else key
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    names = {"target": url or (f"{uri}#{name}" if media_field else "")}
    record = {"source_uri": where, "task": "subject" if references else _default_task(name, cfg),
              "caption": caption, "target_bytes": parts[media_field] if media_field else b"",
              "target_name": name}
    for slot, field in zip(REFERENCE_SLOTS, references):
        record.update({f"{slot}_bytes": parts[field], f"{slot}_name": f"{key}.{field}"})
        names[slot] = f"{uri}#{key}.{field}"
    record["media"] = describe_media(names)
    failed = _failed_status(meta)
    if failed:
        record["filtered_reason"] = failed
    elif not media_field:
        record["error"] = f"{where}: no media file in the sample (fields: {', '.join(parts) or 'none'})"
    return record

