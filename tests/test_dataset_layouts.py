"""Real dataset layouts: WebDataset keys split at the first dot of the basename, img2dataset / video2dataset
output folders read through their tars, manifests with configurable column names, Hugging Face ``datasets``
Parquet files, folders of media with ``.txt`` captions, subject-driven rows with references; the lists of
dropped records name each record's media and reason."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import PrecomputeConfig
from pipelines.data.records import process_record
from pipelines.data.sources import (
    _manifest_record,
    _wds_record,
    list_input_files,
    list_inputs,
    read_segment,
    skip_tar_sidecars,
    split_member_name,
)
from pipelines.data.synth import render_image

TINY = {"partition_size": 4, "buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
        "video": {"max_seconds": 1.0}, "filters": {"dedup": False}}
CUSTOM_COLUMNS = {"uri_column": ["uri", "url", "file_path"], "caption_column": ["caption", "alt_text"],
                  "task_column": ["task", "kind"]}
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""The Arrow type of a Hugging Face ``datasets`` Image column."""


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _records(path: Path, **overrides) -> list[dict]:
    cfg = PrecomputeConfig(input=str(path), **{**TINY, **overrides})
    [file] = list_inputs(cfg)
    return list(read_segment(file, 0, file.records, cfg))


def write_dotted_webdataset(path: Path, rng: random.Random) -> dict[str, str]:
    """A tar whose fields have multi-part extensions and whose folders hold dots; returns {key: caption}."""
    members, captions = [], {}
    for key, fields in (("clips/s7", ("caption.txt", "image.jpg")),
                        ("clips/s8", ("caption.txt", "image.jpg", "meta.json")),
                        ("clips/s9", ("jpg", "txt")),
                        ("v1.2/s10", ("image.jpg", "caption.txt"))):
        image, caption = render_image(rng, 96, 64)
        captions[key] = caption
        payloads = {"jpg": image, "txt": caption.encode(),
                    "json": json.dumps({"caption": "not the caption: the text field wins"}).encode()}
        members += [(f"{key}.{field}", payloads[field.rsplit(".", 1)[-1]]) for field in fields]
    _write_tar(path, members)
    return captions


def write_img2dataset_folder(folder: Path, rng: random.Random) -> dict[str, str | None]:
    """img2dataset's documented webdataset output: ``00000.tar`` (``{key}.jpg``, ``{key}.txt``, ``{key}.json``
    per sample; keys are shard id + index, 9 digits), ``00000.parquet`` (the per-sample metadata, failed ones
    included) and ``00000_stats.json``. Sample 2 failed to download: its JSON says so, and there is no image.
    Returns {key: caption, or None for the failed sample}."""
    folder.mkdir(parents=True, exist_ok=True)
    members, metadata, expected = [], [], {}
    for index, status in enumerate(("success", "success", "failed_to_download")):
        key = f"00000{index:04d}"
        image, caption = render_image(rng, 96, 64)
        url = f"https://example.com/images/{index}.jpg"
        ok = status == "success"
        meta = {"url": url, "caption": caption, "key": key, "status": status,
                "error_message": None if ok else "HTTP Error 404: Not Found",
                "width": 96 if ok else None, "height": 64 if ok else None,
                "original_width": 96 if ok else None, "original_height": 64 if ok else None,
                "exif": None, "sha256": None}
        if ok:
            members.append((f"{key}.jpg", image))
        members += [(f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
        metadata.append(meta)
        expected[key] = caption if ok else None
    _write_tar(folder / "00000.tar", members)
    pq.write_table(pa.Table.from_pylist(metadata), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({
        "count": 3, "successes": 2, "failed_to_download": 1, "failed_to_resize": 0, "duration": 0.5,
        "status_dict": {"success": 2, "HTTP Error 404: Not Found": 1}}, indent=4))
    return expected


def write_manifests(folder: Path, rng: random.Random) -> dict[str, str]:
    """``urls.parquet`` (img2dataset's input: ``url`` + ``caption``) and ``custom.csv`` (``file_path``,
    ``alt_text``, ``kind``); returns {manifest#row: caption}."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rows, custom, expected = [], [], {}
    for index in range(4):
        image, caption = render_image(rng, 96, 64)
        (folder / "media" / f"m{index}.jpg").write_bytes(image)
        if index < 2:
            rows.append({"url": f"media/m{index}.jpg", "caption": caption})
            expected[f"urls.parquet#{index}"] = caption
        else:
            custom.append({"file_path": f"media/m{index}.jpg", "alt_text": caption, "kind": "t2i"})
            expected[f"custom.csv#{index - 2}"] = caption
    pq.write_table(pa.Table.from_pylist(rows), folder / "urls.parquet")
    with open(folder / "custom.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_path", "alt_text", "kind"])
        writer.writeheader()
        writer.writerows(custom)
    return expected


def write_hf_parquet(folder: Path, rng: random.Random) -> dict[str, str]:
    """A Hugging Face ``datasets`` Parquet file (``image`` struct + ``text``): row 0 embeds its bytes, row 1
    holds null bytes and a path relative to the Parquet file (an image ``datasets`` did not embed). Returns
    {file#row: caption}."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (first, first_caption), (second, second_caption) = render_image(rng, 96, 64), render_image(rng, 64, 96)
    (folder / "images" / "b.jpg").write_bytes(second)
    images = [{"bytes": first, "path": "a.jpg"}, {"bytes": None, "path": "images/b.jpg"}]
    pq.write_table(pa.table({"image": pa.array(images, HF_IMAGE), "text": [first_caption, second_caption]}),
                   folder / "train-00000-of-00001.parquet")
    return {"train-00000-of-00001.parquet#0": first_caption, "train-00000-of-00001.parquet#1": second_caption}


def write_captioned_folder(folder: Path, rng: random.Random) -> tuple[dict[str, str], str]:
    """Media files with same-name ``.txt`` captions (``cat.jpg`` + ``cat.txt``, in sub-folders too) and one
    broken image with its caption. Returns ({file: caption} of the good ones, the broken one's name)."""
    expected = {}
    for name in ("cat.jpg", "sub/dog.jpeg"):
        image, caption = render_image(rng, 96, 64)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
        expected[name] = caption
    image, _ = render_image(rng, 96, 64)
    (folder / "broken.jpg").write_bytes(image[: len(image) // 3])
    (folder / "broken.txt").write_text("a photo cut short")
    return expected, "broken.jpg"


def write_subject_inputs(folder: Path, rng: random.Random) -> dict[str, tuple[str, int]]:
    """Subject-driven rows: ``subject.jsonl`` (a row with references ``ref_0`` and ``ref_1``, and one whose
    ``ref_0`` is missing) and ``subject-000.tar`` (``k1.jpg`` + ``k1.ref_0.jpg`` + ``k1.txt``). Returns
    {written source: (caption, references)}; the missing reference is ``media/gone.jpg``."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    images = [render_image(rng, 96, 64) for _ in range(5)]
    for k in range(3):
        (folder / "media" / f"s{k}.jpg").write_bytes(images[k][0])
    rows = [{"uri": "media/s0.jpg", "ref_0": "media/s1.jpg", "ref_1": "media/s2.jpg", "caption": images[0][1]},
            {"uri": "media/s1.jpg", "ref_0": "media/gone.jpg", "caption": "a subject whose reference is lost"}]
    (folder / "subject.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _write_tar(folder / "subject-000.tar", [("k1.jpg", images[3][0]), ("k1.ref_0.jpg", images[4][0]),
                                            ("k1.txt", images[3][1].encode())])
    return {"subject.jsonl#0": (images[0][1], 2), "subject-000.tar#k1": (images[3][1], 1)}


# ------------------------------------------------------------------------------------------- WebDataset keys
@pytest.mark.parametrize("name,split", [
    ("sample7.image.jpg", ("sample7", "image.jpg")),
    ("sample7.caption.txt", ("sample7", "caption.txt")),
    ("sample7.jpg", ("sample7", "jpg")),
    ("shard/sub/sample7.Image.JPG", ("shard/sub/sample7", "image.jpg")),
    ("v1.2/data.set/s7.image.jpg", ("v1.2/data.set/s7", "image.jpg")),  # dots in folders stay in the key
    ("s7.tar.gz", ("s7", "tar.gz")),
    ("README", None),  # no field
    ("dir/LICENSE", None),
    ("._s7.jpg", None),  # macOS resource fork: a basename that starts with a dot
    ("dir/.hidden", None),
    ("s7.", None),
])
def test_member_name_splits_at_the_first_dot_of_the_basename(name, split):
    assert split_member_name(name) == split


def test_dotted_webdataset_tar_gives_whole_samples(tmp_path):
    captions = write_dotted_webdataset(tmp_path / "dotted.tar", random.Random(1))
    records = _records(tmp_path / "dotted.tar")
    assert len(records) == 4, "one record per key, not one per member"
    by_key = {r["source_uri"].split("#", 1)[1]: r for r in records}
    assert set(by_key) == set(captions)
    for key, record in by_key.items():
        assert "error" not in record and "filtered_reason" not in record, record
        assert record["caption"] == captions[key] and record["task"] == "t2i"
        assert record["target_bytes"][:2] == b"\xff\xd8" and record["target_name"].endswith(".jpg")
    assert by_key["clips/s7"]["target_name"] == "clips/s7.image.jpg"


def test_a_member_without_a_field_is_skipped_in_counting_and_reading(tmp_path):
    image, caption = render_image(random.Random(2), 96, 64)
    path = _write_tar(tmp_path / "odd.tar", [("README", b"about this shard"), ("a.jpg", image),
                                             ("a.txt", caption.encode()), ("._a.jpg", b"\0\5\26\7"),
                                             ("b.image.png", image), ("b.caption.txt", b"a second sample")])
    records = _records(path)
    assert [r["source_uri"].rsplit("#", 1)[1] for r in records] == ["a", "b"]
    assert [r["caption"] for r in records] == [caption, "a second sample"]


def test_field_precedence_media_caption_and_metadata():
    cfg = PrecomputeConfig(**TINY)
    jpg, mp4, png = b"\xff\xd8jpeg", b"\0\0\0\x18ftypmp4", b"\x89PNGmask"
    # a field naming the role beats another field of the same kind, whatever the tar order
    parts = {"depth.png": png, "image.jpg": jpg, "ocr.txt": b"STOP", "caption.txt": b"a red sign"}
    record = _wds_record("k", parts, "x.tar", 0, cfg)
    assert (record["target_bytes"], record["caption"], record["target_name"]) == (jpg, "a red sign", "k.image.jpg")
    # a bare field beats a named one; text beats the JSON's caption
    parts = {"image.png": png, "jpg": jpg, "json": b'{"caption": "from json"}', "txt": b"from txt"}
    record = _wds_record("k", parts, "x.tar", 0, cfg)
    assert (record["target_bytes"], record["caption"]) == (jpg, "from txt")
    # the JSON's caption when there is no text field; the bare json before a named one
    parts = {"jpg": jpg, "extra.json": b'{"caption": "wrong one"}', "json": b'{"caption": "from json"}'}
    assert _wds_record("k", parts, "x.tar", 0, cfg)["caption"] == "from json"
    # the configured task picks the media kind; without one, tar order among equals
    parts = {"jpg": jpg, "mp4": mp4, "txt": b"a square moving"}
    assert _wds_record("k", parts, "x.tar", 0, cfg)["target_bytes"] == jpg
    video = _wds_record("k", parts, "x.tar", 0, PrecomputeConfig(task="t2v", **TINY))
    assert (video["target_bytes"], video["task"], video["target_name"]) == (mp4, "t2v", "k.mp4")
    assert _wds_record("k", parts, "x.tar", 0, PrecomputeConfig(task="t2i", **TINY))["target_bytes"] == jpg
    # no media: quarantined, naming the fields it had
    record = _wds_record("k", {"caption.txt": b"words only"}, "x.tar", 0, cfg)
    assert "no media file" in record["error"] and "caption.txt" in record["error"]


def test_failed_status_is_filtered_with_its_reason():
    cfg = PrecomputeConfig(**TINY)
    meta = {"key": "000000002", "status": "failed_to_download", "error_message": "HTTP Error 404"}
    record = _wds_record("000000002", {"txt": b"a lost picture", "json": json.dumps(meta).encode()},
                         "00000.tar", 2, cfg)
    assert record["filtered_reason"] == "status_failed_to_download" and "error" not in record
    [row] = process_record(record, 0, 2, cfg)
    assert (row["status"], row["stage"], row["reason"]) == ("filtered", "read", "status_failed_to_download")
    ok = _wds_record("k", {"jpg": b"\xff\xd8", "json": b'{"status": "success", "caption": "fine"}'}, "x", 0, cfg)
    assert "filtered_reason" not in ok and "error" not in ok and ok["caption"] == "fine"


# ------------------------------------------------------------------------------------------- img2dataset
def test_img2dataset_folder_is_listed_as_its_tars(tmp_path):
    folder = tmp_path / "i2d"
    expected = write_img2dataset_folder(folder, random.Random(3))
    files = list_inputs(PrecomputeConfig(input=str(folder), **TINY))
    assert [(Path(f.uri).name, f.format, f.records) for f in files] == [("00000.tar", "webdataset", 3)]
    records = _records(folder)
    outcome = {r["source_uri"].rsplit("#", 1)[1]: r for r in records}
    assert set(outcome) == set(expected)
    for key, caption in expected.items():
        if caption is None:
            assert outcome[key]["filtered_reason"] == "status_failed_to_download"
        else:
            assert outcome[key]["caption"] == caption and outcome[key]["target_bytes"][:2] == b"\xff\xd8"


def test_sidecars_are_skipped_only_beside_their_shard():
    paths = ["d/00000.tar", "d/00000.parquet", "d/00000_stats.json", "d/00001.tar.gz", "d/00001.parquet",
             "d/00001_stats.json", "p/00000.parquet", "p/00000_stats.json", "m/items.parquet", "m/run_stats.json",
             "m/manifest.jsonl"]
    assert skip_tar_sidecars(paths) == ["d/00000.tar", "d/00001.tar.gz", "p/00000.parquet", "m/items.parquet",
                                        "m/run_stats.json", "m/manifest.jsonl"]


# ------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("row,uri", [
    ({"url": "media/a.jpg"}, "m/media/a.jpg"),
    ({"path": "/data/a.jpg"}, "/data/a.jpg"),
    ({"uri": "s3://b/a.jpg", "url": "https://x/a.jpg"}, "s3://b/a.jpg"),
    ({"path": "local/a.jpg", "url": "https://x/a.jpg"}, "m/local/a.jpg"),  # a local copy before the remote one
    ({"uri": "", "url": "u.jpg"}, "m/u.jpg"),  # an empty value falls through to the next column
    ({"image": "i.jpg"}, "m/i.jpg"),
])
def test_manifest_default_uri_columns(row, uri):
    record = _manifest_record({**row, "caption": "words"}, "m/list.jsonl", 0, PrecomputeConfig(**TINY))
    assert record["target_uri"] == uri and record["caption"] == "words"


def test_manifest_custom_columns():
    cfg = PrecomputeConfig(manifest={**CUSTOM_COLUMNS, "source_column": "before", "answer_column": "reply"},
                           **TINY)
    assert cfg.manifest.system_column == ("system",)
    record = _manifest_record({"file_path": "x.jpg", "alt_text": "a sign", "kind": "t2i"}, "m/a.csv", 3, cfg)
    assert (record["target_uri"], record["caption"], record["task"]) == ("m/x.jpg", "a sign", "t2i")
    edit = _manifest_record({"url": "after.jpg", "before": "before.jpg", "caption": "make it blue",
                             "task": "i2i"}, "m/a.csv", 4, cfg)
    assert (edit["source_uri_media"], edit["target_uri"], edit["task"]) == ("m/before.jpg", "m/after.jpg", "i2i")
    qa = _manifest_record({"uri": "q.jpg", "task": "i2t", "question": "what?", "reply": "a sign"}, "m/a", 5, cfg)
    assert (qa["question"], qa["answer"]) == ("what?", "a sign")
    with pytest.raises(ValueError, match="manifest.uri_column"):
        PrecomputeConfig(manifest={"uri_column": []})


def test_csv_manifest_without_a_uri_column_is_refused_at_listing(tmp_path):
    (tmp_path / "list.csv").write_text("file_path,alt_text\nmedia/a.jpg,a sign\n")
    with pytest.raises(ValueError, match=r"list.csv: no media URI column; manifest.uri_column names uri, "):
        list_inputs(PrecomputeConfig(input=str(tmp_path / "list.csv"), **TINY))
    cfg = PrecomputeConfig(input=str(tmp_path / "list.csv"), manifest=CUSTOM_COLUMNS, **TINY)
    [file] = list_inputs(cfg)
    [record] = read_segment(file, 0, 1, cfg)
    assert record["target_uri"].endswith("media/a.jpg") and record["caption"] == "a sign"


@pytest.mark.parametrize("column", ["caption", "text", "TEXT", "txt"])
def test_manifest_default_caption_columns(column):
    record = _manifest_record({"uri": "a.jpg", column: "a red sign"}, "m/list.jsonl", 0, PrecomputeConfig(**TINY))
    assert record["caption"] == "a red sign"
    both = _manifest_record({"uri": "a.jpg", "text": "second", "caption": "first"}, "m/l.jsonl", 1,
                            PrecomputeConfig(**TINY))
    assert both["caption"] == "first", "the names are tried in order"


def test_a_file_without_a_caption_column_is_refused_at_listing(tmp_path):
    """CSV, Parquet manifest and Parquet release layout alike, before any record is read; QA rows (an answer
    column, or the i2t / v2t layouts) carry their text elsewhere."""
    names = r"manifest.caption_column names caption, text, TEXT, txt"
    (tmp_path / "list.csv").write_text("uri,alt\nmedia/a.jpg,a sign\n")
    with pytest.raises(ValueError, match=rf"list.csv: no caption column; {names}, the file has uri, alt"):
        list_inputs(PrecomputeConfig(input=str(tmp_path / "list.csv"), **TINY))
    pq.write_table(pa.table({"url": ["a.jpg"], "label": ["x"]}), tmp_path / "urls.parquet")
    with pytest.raises(ValueError, match=rf"urls.parquet: no caption column; {names}, the file has url, label"):
        list_inputs(PrecomputeConfig(input=str(tmp_path / "urls.parquet"), **TINY))
    pq.write_table(pa.table({"image_bytes": [b"x"], "id": [1]}), tmp_path / "t2i.parquet")
    with pytest.raises(ValueError, match=rf"t2i.parquet: no caption column; {names}, the file has image_bytes, id"):
        list_inputs(PrecomputeConfig(input=str(tmp_path / "t2i.parquet"), **TINY))
    (tmp_path / "qa.csv").write_text("uri,question,answer\nq.jpg,what?,a sign\n")
    assert list_inputs(PrecomputeConfig(input=str(tmp_path / "qa.csv"), **TINY))[0].records == 1
    pq.write_table(pa.table({"image_bytes": [b"x"], "caption_a": ["a sign"]}), tmp_path / "i2t.parquet")
    assert list_inputs(PrecomputeConfig(input=str(tmp_path / "i2t.parquet"), **TINY))[0].records == 1


def test_release_layout_and_csv_read_the_caption_from_a_text_column(tmp_path):
    rng = random.Random(2)
    image, caption = render_image(rng, 96, 64)
    pq.write_table(pa.table({"image_bytes": [image], "TEXT": [caption]}), tmp_path / "t2i.parquet")
    [record] = _records(tmp_path / "t2i.parquet")
    assert (record["task"], record["caption"]) == ("t2i", caption)
    assert [r["status"] for r in process_record(record, 0, 0, PrecomputeConfig(**TINY))] == ["ok"]
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.jpg").write_bytes(image)
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["url", "txt"], ["media/a.jpg", caption]])
    [record] = _records(tmp_path / "list.csv")
    assert record["caption"] == caption and record["target_uri"].endswith("media/a.jpg")


def test_text_fields_are_stored_stripped(tmp_path):
    """A caption file's final newline and padding around any text field are gone as the record is read (the
    release strips them; "a cat\\n" would be one more token), whatever the layout; a blank caption is missing."""
    cfg = PrecomputeConfig(**TINY)
    jpg = b"\xff\xd8jpeg"
    assert _wds_record("k", {"jpg": jpg, "txt": b"a cat\n"}, "x.tar", 0, cfg)["caption"] == "a cat"
    assert _wds_record("k", {"jpg": jpg, "json": b'{"caption": " a cat\\t"}'}, "x.tar", 0, cfg)["caption"] == "a cat"
    row = {"uri": "a.jpg", "caption": "  a cat\r\n", "system": "be brief\n", "question": " what? ",
           "answer": "a cat\n"}
    record = _manifest_record(row, "m/list.jsonl", 0, cfg)
    assert [record[k] for k in ("caption", "system", "question", "answer")] == ["a cat", "be brief", "what?",
                                                                                 "a cat"]
    image, _ = render_image(random.Random(4), 96, 64)
    pq.write_table(pa.table({"image_bytes": [image, image], "caption": ["a cat\n", " \n"]}),
                   tmp_path / "t2i.parquet")
    written, blank = _records(tmp_path / "t2i.parquet")
    assert written["caption"] == "a cat"
    assert [r["caption"] for r in process_record(written, 0, 0, cfg)] == ["a cat"], "the shard row holds it so"
    assert [r["reason"] for r in process_record(blank, 0, 1, cfg)] == ["missing_caption"]


# ------------------------------------------------------------------------------------------- Hugging Face Parquet
def test_hugging_face_parquet_reads_the_image_struct(tmp_path):
    """A ``datasets`` Parquet file (``image`` {bytes, path} + ``text``) reads without configuration: the
    embedded bytes, else the file at ``path`` relative to the Parquet file; a row whose file is gone is
    quarantined naming it."""
    expected = write_hf_parquet(tmp_path / "hf", random.Random(5))
    first, second = _records(tmp_path / "hf")
    assert [first["caption"], second["caption"]] == list(expected.values())
    assert first["target_bytes"][:2] == b"\xff\xd8" and first["media"] == "a.jpg"
    assert second["target_uri"] == second["media"] == f"{tmp_path}/hf/images/b.jpg"
    cfg = PrecomputeConfig(**TINY)
    for record, width in ((first, 96), (second, 64)):
        [row] = process_record(record, 0, 0, cfg)
        assert (row["status"], row["task"], row["target_width"], row["media"]) == ("ok", "t2i", width,
                                                                                   record["media"])
    lost = pa.array([{"bytes": None, "path": "gone.jpg"}], HF_IMAGE)
    pq.write_table(pa.table({"image": lost, "text": ["a lost image"]}), tmp_path / "lost.parquet")
    [record] = _records(tmp_path / "lost.parquet")
    [row] = process_record(record, 0, 0, cfg)
    assert (row["status"], row["reason"], row["media"]) == ("quarantined", "missing_file", f"{tmp_path}/gone.jpg")


# ------------------------------------------------------------------------------------------- media + .txt folders
def test_a_folder_of_media_with_txt_captions_is_read(tmp_path):
    """Each media file of a folder is a sample, its caption the same-name ``.txt``; one without a caption is
    filtered, a broken one quarantined, each naming its file."""
    folder = tmp_path / "pairs"
    expected, broken = write_captioned_folder(folder, random.Random(6))
    (folder / "lone.jpg").write_bytes(render_image(random.Random(7), 96, 64)[0])
    cfg = PrecomputeConfig(input=str(folder), **TINY)
    files = list_inputs(cfg)
    assert [(Path(f.uri).relative_to(folder).as_posix(), f.format, f.records) for f in files] == [
        ("broken.jpg", "media", 1), ("cat.jpg", "media", 1), ("lone.jpg", "media", 1), ("sub/dog.jpeg", "media", 1)]
    records = {Path(r["source_uri"]).relative_to(folder).as_posix(): r
               for file in files for r in read_segment(file, 0, 1, cfg)}
    for name, caption in expected.items():
        record = records[name]
        assert record["caption"] == caption and record["target_uri"] == record["media"] == f"{folder}/{name}"
        assert [row["status"] for row in process_record(record, 0, 0, cfg)] == ["ok"]
    [lone] = process_record(records["lone.jpg"], 0, 0, cfg)
    assert (lone["status"], lone["reason"], lone["media"]) == ("filtered", "missing_caption", f"{folder}/lone.jpg")
    [bad] = process_record(records[broken], 0, 0, cfg)
    assert (bad["status"], bad["reason"], bad["media"]) == ("quarantined", "undecodable_image",
                                                            f"{folder}/{broken}")


def test_media_files_beside_other_inputs_are_read_only_with_a_caption(tmp_path):
    """Beside manifests, a media file is a sample only with its caption (a manifest's media are not read a
    second time); ``input_format: media`` reads every media file, and nothing else."""
    folder = tmp_path / "mixed"
    write_captioned_folder(folder / "pairs", random.Random(6))
    write_manifests(folder / "manifests", random.Random(7))
    (folder / "pairs" / "lone.jpg").write_bytes(render_image(random.Random(8), 96, 64)[0])

    def listed(**overrides) -> list[tuple[str, str]]:
        cfg = PrecomputeConfig(input=str(folder), manifest=CUSTOM_COLUMNS, **TINY, **overrides)
        return [(Path(uri).relative_to(folder).as_posix(), fmt) for uri, fmt in list_input_files(cfg)]

    assert listed() == [("manifests/custom.csv", "csv"), ("manifests/urls.parquet", "parquet"),
                        ("pairs/broken.jpg", "media"), ("pairs/cat.jpg", "media"), ("pairs/sub/dog.jpeg", "media")]
    assert listed(input_format="media") == [(f"manifests/media/m{k}.jpg", "media") for k in range(4)] + [
        ("pairs/broken.jpg", "media"), ("pairs/cat.jpg", "media"), ("pairs/lone.jpg", "media"),
        ("pairs/sub/dog.jpeg", "media")]


# ------------------------------------------------------------------------------------------- subject references
def test_subject_rows_read_their_references(tmp_path):
    """Reference columns of a manifest and ``ref_k`` members of a WebDataset sample fill the reference slots
    of a ``subject`` row: each decoded and bucketed with its ViT input, as an edit source is."""
    write_subject_inputs(tmp_path, random.Random(9))
    cfg = PrecomputeConfig(**TINY)
    manifest_row, lost = _records(tmp_path / "subject.jsonl")
    media = tmp_path / "media"
    assert (manifest_row["task"], manifest_row["ref_0_uri"], manifest_row["ref_1_uri"]) == (
        "subject", f"{media}/s1.jpg", f"{media}/s2.jpg")
    assert manifest_row["media"] == f"{media}/s0.jpg; ref_0={media}/s1.jpg; ref_1={media}/s2.jpg"
    [tar_row] = _records(tmp_path / "subject-000.tar")
    assert (tar_row["task"], tar_row["target_name"], tar_row["ref_0_name"]) == ("subject", "k1.jpg", "k1.ref_0.jpg")
    assert "ref_1_bytes" not in tar_row
    for record, references in ((manifest_row, 2), (tar_row, 1)):
        [row] = process_record(record, 0, 0, cfg)
        assert (row["status"], row["task"]) == ("ok", "subject")
        for k in range(3):
            filled = k < references
            assert (bool(row[f"ref_{k}_pixels"]), bool(row[f"ref_{k}_vit_pixels"])) == (filled, filled), k
        assert not row["target_vit_pixels"] and not row["source_pixels"]
    [row] = process_record(manifest_row, 0, 0, cfg)
    contents = [(media / f"s{k}.jpg").read_bytes() for k in range(3)]
    assert row["content_sha256"] == hashlib.sha256(b"".join(contents)).hexdigest(), "references are content"
    [row] = process_record(lost, 0, 1, cfg)
    assert (row["status"], row["reason"]) == ("quarantined", "missing_file") and "gone.jpg" in row["error"]
    assert row["media"] == f"{media}/s1.jpg; ref_0={media}/gone.jpg"


def test_references_are_at_most_three_and_never_the_target():
    cfg = PrecomputeConfig(manifest={"reference_columns": ["r0", "r1", "r2", "r3"]}, **TINY)
    with pytest.raises(ValueError, match="4 references; a row holds at most 3"):
        _manifest_record({"uri": "t.jpg", "r0": "a", "r1": "b", "r2": "c", "r3": "d", "caption": "x"}, "m", 0, cfg)
    record = _wds_record("k", {"ref_0.jpg": b"\xff\xd8", "txt": b"a subject"}, "x.tar", 0, cfg)
    assert "no media file" in record["error"]
    record = _manifest_record({"uri": "t.jpg", "ref_0": "r.jpg", "task": "t2i", "caption": "x"}, "m/l.jsonl", 0,
                              PrecomputeConfig(**TINY))
    assert record["task"] == "t2i", "a row that names its task keeps it"


# ------------------------------------------------------------------------------------------- dropped records
class _Duplicates:
    """A duplicate index that calls the given records of a partition exact duplicates."""

    def __init__(self, records: dict[int, str]) -> None:
        self.records = records

    def wait_for_earlier(self, partition: int, seconds: float) -> None:
        pass

    def claim(self, partition: int, records: dict) -> dict[int, str]:
        return {r: reason for r, reason in self.records.items() if r in records}


def test_dropped_records_are_listed_with_reason_and_media(tmp_path):
    """``filtered/part-N.parquet`` lists a partition's filtered records (duplicates included) and
    ``quarantine/part-N.parquet`` its quarantined ones, one row per record with its stage, reason and media;
    they hold as many records as the commit counts."""
    from pipelines.data.writer import OUTPUT_FOLDERS, write_partition

    for folder in OUTPUT_FOLDERS:
        (tmp_path / "out" / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(10)
    media = tmp_path / "media"
    media.mkdir()
    image, caption = render_image(rng, 96, 64)
    (media / "ok.jpg").write_bytes(image)
    (media / "tiny.jpg").write_bytes(render_image(rng, 16, 16)[0])
    rows = [{"uri": "media/ok.jpg", "caption": caption}, {"uri": "media/ok.jpg", "caption": caption},
            {"uri": "media/gone.jpg", "caption": "a lost file"}, {"uri": "media/tiny.jpg", "caption": "a tiny one"},
            {"uri": "media/ok.jpg"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = PrecomputeConfig(output=str(tmp_path / "out"), **TINY)
    out = [row for index, record in enumerate(_records(tmp_path / "list.jsonl"))
           for row in process_record(record, 0, index, cfg)]
    commit = write_partition(pd.DataFrame(out), cfg, str(tmp_path / "out"), _Duplicates({1: "exact_duplicate"}))

    def listed(folder: str) -> list[tuple]:
        table = pq.read_table(tmp_path / "out" / folder / "part-00000.parquet")
        return [(r["source_uri"].rsplit("#", 1)[1], r["stage"], r["reason"], r["media"]) for r in table.to_pylist()]

    assert listed("filtered") == [("3", "size", "too_small", f"{media}/tiny.jpg"),
                                  ("4", "caption", "missing_caption", f"{media}/ok.jpg"),
                                  ("1", "dedup", "exact_duplicate", f"{media}/ok.jpg")]
    assert listed("quarantine") == [("2", "read", "missing_file", f"{media}/gone.jpg")]
    assert (commit["inputs_written"], commit["filtered_inputs"], commit["quarantined_inputs"]) == (1, 3, 1)
    [error] = pq.read_table(tmp_path / "out" / "quarantine").column("error").to_pylist()
    assert "gone.jpg" in error


def test_webdataset_and_release_records_name_their_media(tmp_path):
    """A tar sample names its member (or img2dataset's ``url``), a release Parquet row its byte columns."""
    cfg = PrecomputeConfig(**TINY)
    record = _wds_record("s7", {"image.jpg": b"\xff\xd8", "caption.txt": b"a sign"}, "d/x.tar", 0, cfg)
    assert record["media"] == "d/x.tar#s7.image.jpg"
    meta = json.dumps({"url": "https://example.com/7.jpg", "status": "failed_to_download"}).encode()
    record = _wds_record("s7", {"txt": b"a sign", "json": meta}, "d/x.tar", 0, cfg)
    [row] = process_record(record, 0, 0, cfg)
    assert (row["status"], row["media"]) == ("filtered", "https://example.com/7.jpg")
    image, caption = render_image(random.Random(11), 96, 64)
    pq.write_table(pa.table({"input_image_bytes": [image], "output_image_bytes": [image], "caption": [caption]}),
                   tmp_path / "i2i.parquet")
    [record] = _records(tmp_path / "i2i.parquet")
    assert record["media"] == "output_image_bytes; source=input_image_bytes"


# ------------------------------------------------------------------------------------------- one real run
@pytest.mark.slow
def test_precompute_over_a_mixed_corpus_of_real_layouts(ray_local, tmp_path):
    """One run over every layout side by side: WebDataset, img2dataset, manifests, a Hugging Face Parquet
    file, a folder of media with captions and subject-driven rows; the references reach the shard columns
    training reads, and each dropped record is listed with its reason and media."""
    from pipelines.data.manifest import read_manifest
    from pipelines.data.pipeline import run_precompute

    rng = random.Random(4)
    corpus = tmp_path / "corpus"
    wds = write_dotted_webdataset(corpus / "wds" / "dotted-000.tar", rng)
    i2d = write_img2dataset_folder(corpus / "img2dataset", rng)
    manifests = write_manifests(corpus / "manifests", rng)
    hf = write_hf_parquet(corpus / "hf", rng)
    pairs, broken = write_captioned_folder(corpus / "pairs", rng)
    subject = write_subject_inputs(corpus / "subject", rng)
    out = tmp_path / "out"
    columns = {**CUSTOM_COLUMNS, "uri_column": [*CUSTOM_COLUMNS["uri_column"], "image"],
               "caption_column": [*CUSTOM_COLUMNS["caption_column"], "text"]}
    cfg = PrecomputeConfig(input=str(corpus), output=str(out), manifest=columns, **TINY)
    run_precompute(cfg, progress=False)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert stats["inputs"] == len(wds) + len(i2d) + len(manifests) + len(hf) + len(pairs) + 1 + len(subject) + 1
    assert (stats["inputs_written"], stats["inputs_filtered"], stats["inputs_quarantined"]) == (16, 1, 2)
    assert stats["filtered_by_reason"] == {"read:status_failed_to_download": 1}
    assert stats["quarantined_by_reason"] == {"decode:undecodable_image": 1, "read:missing_file": 1}
    rows = []
    for shard in read_manifest(str(out))[1]:
        rows += pq.read_table(out / shard["shard"]).to_pylist()
    written = {r["source_uri"].split(f"{corpus}/", 1)[1]: r for r in rows}
    expected = {f"wds/dotted-000.tar#{key}": caption for key, caption in wds.items()}
    expected |= {f"img2dataset/00000.tar#{key}": caption for key, caption in i2d.items() if caption is not None}
    expected |= {f"manifests/{where}": caption for where, caption in manifests.items()}
    expected |= {f"hf/{where}": caption for where, caption in hf.items()}
    expected |= {f"pairs/{name}": caption for name, caption in pairs.items()}
    expected |= {f"subject/{where}": caption for where, (caption, _) in subject.items()}
    assert {where: row["caption"] for where, row in written.items()} == expected
    for where, row in written.items():
        references = subject[where.removeprefix("subject/")][1] if where.startswith("subject/") else 0
        assert row["task"] == ("subject" if references else "t2i"), where
        for k in range(3):  # the columns training reads: VAE latents and ViT features of each reference
            filled = k < references
            assert (row.get(f"ref_{k}_vae") is not None, row.get(f"ref_{k}_vit") is not None) == (filled, filled)
        assert row["target_vae"] is not None and row.get("target_vit") is None
    _check_subject_samples(out, cfg, subject)

    def listed(folder: str) -> dict[str, tuple[str, str]]:
        return {r["source_uri"].split(f"{corpus}/", 1)[1]: (r["reason"], r["media"])
                for r in pq.read_table(out / folder).to_pylist()}

    lost = f"{corpus}/subject/media/s1.jpg; ref_0={corpus}/subject/media/gone.jpg"
    assert listed("quarantine") == {f"pairs/{broken}": ("undecodable_image", f"{corpus}/pairs/{broken}"),
                                    "subject/subject.jsonl#1": ("missing_file", lost)}
    assert listed("filtered") == {"img2dataset/00000.tar#000000002": ("status_failed_to_download",
                                                                       "https://example.com/images/2.jpg")}


def _check_subject_samples(out: Path, cfg: PrecomputeConfig, subject: dict[str, tuple[str, int]]) -> None:
    """Training turns the subject rows into samples conditioned on each reference: a ViT span and a clean VAE
    span per reference, as the release lays them out."""
    from lance_core.shards import shard_rows
    from lance_core.tokenizer import ByteTokenizer
    from pipelines.data.manifest import read_manifest
    from pipelines.train.config import DataSection
    from pipelines.train.data import row_to_sample

    data = DataSection(caption_dropout=0.0, condition_dropout=0.0)
    seen = 0
    for shard in read_manifest(str(out))[1]:
        for row in shard_rows(pq.read_table(out / shard["shard"])):
            if row["task"] != "subject":
                continue
            references = subject[row["source_uri"].split("/subject/", 1)[1]][1]
            sample = row_to_sample(row, ByteTokenizer(), cfg.model.build(), data, random.Random(0))
            roles = [span.role for span in sample.spans if span.role in ("vit", "reference")]
            assert roles == ["vit", "reference"] * references
            seen += 1
    assert seen == len(subject)
