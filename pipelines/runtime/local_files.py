"""Local files written whole and read back safely: a JSON-lines log read past a cut-short last line, and
a file replaced at once (written beside it, then renamed) so a reader or a resume never sees a part."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines log, skipping lines that do not parse: a process killed while
    appending leaves the last line cut short (and the next append may land after it)."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _replace_whole(path: Path, fill) -> None:
    """Write ``path`` through ``fill(file)`` beside it under a temporary name, then rename it into place:
    readers (and a resume after a kill) see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    _replace_whole(path, lambda out: out.write(text.encode()))


def copy_file_atomic(source: Path, path: Path) -> None:
    def fill(out) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 24)

    _replace_whole(path, fill)
