"""Real dataset layouts: WebDataset keys split at the first dot of the basename, img2dataset / video2dataset
output folders read through their tars, manifests with configurable column names."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import PrecomputeConfig
from pipelines.data.records import process_record
from pipelines.data.sources import (
    _manifest_record,
    _wds_record,
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


# ------------------------------------------------------------------------------------------- one real run
@pytest.mark.slow
def test_precompute_over_a_mixed_corpus_of_real_layouts(ray_local, tmp_path):
    from pipelines.data.pipeline import run_precompute

    rng = random.Random(4)
    corpus = tmp_path / "corpus"
    wds = write_dotted_webdataset(corpus / "wds" / "dotted-000.tar", rng)
    i2d = write_img2dataset_folder(corpus / "img2dataset", rng)
    manifests = write_manifests(corpus / "manifests", rng)
    out = tmp_path / "out"
    cfg = PrecomputeConfig(input=str(corpus), output=str(out), manifest=CUSTOM_COLUMNS, **TINY)
    run_precompute(cfg, progress=False)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert stats["inputs"] == len(wds) + len(i2d) + len(manifests) == 11
    assert (stats["inputs_written"], stats["inputs_filtered"], stats["inputs_quarantined"]) == (10, 1, 0)
    assert stats["filtered_by_reason"] == {"read:status_failed_to_download": 1}
    rows = []
    from pipelines.data.manifest import read_manifest

    for shard in read_manifest(str(out))[1]:
        rows += pq.read_table(out / shard["shard"], columns=["source_uri", "caption", "task"]).to_pylist()
    written = {r["source_uri"].split(f"{corpus}/", 1)[1]: r["caption"] for r in rows}
    expected = {f"wds/dotted-000.tar#{key}": caption for key, caption in wds.items()}
    expected |= {f"img2dataset/00000.tar#{key}": caption for key, caption in i2d.items() if caption is not None}
    expected |= {f"manifests/{where}": caption for where, caption in manifests.items()}
    assert written == expected
    assert {r["task"] for r in rows} == {"t2i"}
