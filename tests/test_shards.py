"""The latent shard layout (lance_core/shards.py): tensors as flat float16/float32 lists with a shape column,
the schema's meaning in the Parquet metadata, columns no row fills left out, readable with pyarrow, numpy,
pandas (and DuckDB where installed) alone; version-1 shards (raw bytes) still read."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from lance_core.shards import (
    FLOAT16_MAX,
    LEGACY_SCHEMA,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    check_schema,
    column_text,
    dataset_schema,
    parquet_options,
    shard_rows,
    shard_table,
    storage_values,
    tensor_to_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
VAE_INFO = {"encoder": "Wan2.2 VAE (diffusers AutoencoderKLWan)", "normalisation": "(mu - m[c]) / s[c]",
            "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
VIT_INFO = {"encoder": "Qwen2.5-VL vision tower with its patch merger (transformers)", "feature_size": 64}


def _base(task: str, k: int) -> dict:
    return {"sample_id": f"{task}-{k}", "source_uri": f"test://{task}/{k}", "content_sha256": f"{k:064x}",
            "task": task, "caption": f"caption {k}", "clip_index": 0, "scores": "{}"}


def _rows(task: str, count: int = 3, seed: int = 0, std: bool = False) -> list[dict]:
    """Rows of one task with random tensors of per-row shapes (buckets and frame counts differ)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(count):
        row = _base(task, k)
        frames = 1 if task in ("t2i", "i2i", "i2t") else 1 + k
        shape = (frames, 2 + k, 3, 48)
        if task != "i2t":
            row["target_vae"] = torch.randn(*shape, generator=gen) * 3
            row.update(target_width=96 + k, target_height=64, target_frames=4 * frames - 3,
                       target_fps=12.0 if frames > 1 else 0.0)
            if std:
                row["target_vae_std"] = torch.rand(*shape, generator=gen) + 0.01
        if task == "i2i":
            row["source_vae"] = torch.randn(*shape, generator=gen)
            row["source_vit"] = torch.randn(1 * 2 * (k + 1), 64, generator=gen)
            row["source_vit_grid"] = [1, 2, k + 1]
        if task == "i2t":
            row["target_vit"] = torch.randn(2 * (k + 1), 64, generator=gen)
            row["target_vit_grid"] = [1, 2, k + 1]
            row.update(system="describe", question="what is shown?", answer=f"answer {k}")
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict], latent_dtype: str = "bf16") -> Path:
    table = shard_table(rows, latent_dtype, latents=VAE_INFO, vit=VIT_INFO)
    pq.write_table(table, path, compression="zstd", **parquet_options(table.schema))
    return path


def _bf16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.bfloat16).float().numpy()


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("latent_dtype,stored,precision", [
    ("bf16", np.float16, _bf16), ("fp16", np.float16, lambda t: t.half().float().numpy()),
    ("fp32", np.float32, lambda t: t.numpy()),
])
def test_tensors_round_trip_in_their_shapes_and_precision(tmp_path, latent_dtype, stored, precision):
    rows = _rows("t2v", std=True) + _rows("i2i") + _rows("i2t")
    path = _write(tmp_path / "mixed.parquet", rows, latent_dtype)
    pf = pq.ParquetFile(path)
    assert check_schema(pf.schema_arrow, str(path)) == SCHEMA_VERSION
    got = shard_rows(pf.read())
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in rows]
    for want, row in zip(rows, got):
        for name in ("target_vae", "target_vae_std", "source_vae", "source_vit", "target_vit"):
            if want.get(name) is None:
                assert row.get(name) is None, name
                continue
            value = row[name]
            assert value.dtype == stored and value.shape == tuple(want[name].shape), name
            assert np.array_equal(value.astype(np.float32), precision(want[name])), name
        for slot in ("target", "source"):
            if want.get(f"{slot}_vae") is not None:
                assert row[f"{slot}_vae_shape"] == list(want[f"{slot}_vae"].shape)
            if want.get(f"{slot}_vit") is not None:
                assert row[f"{slot}_vit_shape"] == list(want[f"{slot}_vit"].shape)
                assert row[f"{slot}_vit_grid"] == want[f"{slot}_vit_grid"]
        assert row["caption"] == want["caption"] and row.get("answer") == want.get("answer")


def test_bf16_rounding_is_torch_bfloat16_and_float16_holds_it_exactly():
    edges = [0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 65280.0, -65280.0, 2 ** -14]  # ties, extremes
    spread = torch.randn(100_000) * 10 ** torch.randint(-4, 4, (100_000,)).float()
    values = torch.cat([spread, torch.tensor(edges)])
    stored = storage_values(values, "bf16")
    assert stored.dtype == np.float16
    normal = np.abs(_bf16(values)) >= 2 ** -14  # float16 normals: bfloat16 values there are kept exactly
    assert np.array_equal(stored.astype(np.float32)[normal], _bf16(values)[normal])
    assert np.abs(stored.astype(np.float32) - _bf16(values)).max() <= 2 ** -25


def test_values_two_bytes_cannot_hold_are_refused_naming_fp32():
    with pytest.raises(ValueError, match="beyond float16's range.*fp32"):
        storage_values(np.array([1.0, 70000.0]), "bf16")
    with pytest.raises(ValueError, match="beyond float16's range"):
        storage_values(np.array([-FLOAT16_MAX * 2]), "fp16")
    with pytest.raises(ValueError, match="not finite"):
        storage_values(np.array([1.0, np.nan]), "fp32")
    assert storage_values(np.array([70000.0]), "fp32")[0] == 70000.0


def test_the_vae_stage_quarantines_a_sample_it_cannot_store():
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.encode import VAEEncoder

    pixels = np.random.default_rng(0).integers(0, 255, (1, 32, 48, 3), dtype=np.uint8)
    batch = pd.DataFrame([{"status": "ok", "stage": "", "reason": "", "error": "",
                           "target_pixels": pixels.tobytes(), "target_shape": list(pixels.shape),
                           "source_pixels": b"", "source_shape": []}] * 2)
    stage = VAEEncoder(PrecomputeConfig(latent_dtype="bf16").model_dump_json())
    real = stage.vae.encode
    stage.vae.encode = lambda px: torch.cat([real(px[:1]), real(px[1:]) * 0 + 1e6])  # the second overflows
    out = stage(batch).to_pylist()
    assert out[0]["status"] == "ok" and len(out[0]["target_vae"]) == 1 * 2 * 3 * 48 * 2
    assert (out[1]["status"], out[1]["stage"], out[1]["reason"]) == ("quarantined", "vae", "not_storable")
    assert "fp32" in out[1]["error"] and out[1]["target_vae"] == b""
    info = json.loads(out[0]["vae_info"])
    assert info["channels"] == 48 and len(info["latents_mean"]) == len(info["latents_std"]) == 48


# ---------------------------------------------------------------------------------------------- metadata
def test_metadata_says_what_each_column_is(tmp_path):
    path = _write(tmp_path / "i2i.parquet", _rows("i2i"))
    meta = {k.decode(): v.decode() for k, v in pq.read_metadata(path).metadata.items()}
    assert meta["lance_shard_schema"] == str(SCHEMA_VERSION)
    assert "row-major" in meta["lance.layout"]
    columns = json.loads(meta["lance.columns"])
    assert list(columns) == pq.read_schema(path).names  # every column present, and only those
    assert all(entry["description"] == column_text(name) for name, entry in columns.items())
    assert columns["target_vae"] | {"description": ""} == {
        "description": "", "type": "list<item: halffloat>", "shape_column": "target_vae_shape",
        "dims": ["T", "H", "W", "C"], "dtype": "float16", "precision": "bfloat16"}
    assert columns["source_vit"]["dims"] == ["L", "D"]
    assert columns["source_vit"]["shape_column"] == "source_vit_shape"
    latents, vit = json.loads(meta["lance.latents"]), json.loads(meta["lance.vit"])
    assert latents["encoder"].startswith("Wan2.2 VAE")
    assert latents["normalisation"] == VAE_INFO["normalisation"]
    assert latents["precision"] == "bfloat16" and latents["storage_dtype"] == "float16"
    assert vit["encoder"].startswith("Qwen2.5-VL") and vit["feature_size"] == 64


# ---------------------------------------------------------------------------------------------- null columns
def test_columns_no_row_fills_are_left_out_and_read_as_null(tmp_path, tokenizer, tiny_cfg):
    from pipelines.runtime.shard_manifest import CLASS_COLUMNS, shard_counts
    from pipelines.train.config import DataSection
    from pipelines.train.data import row_to_sample, slot_visual
    from pipelines.train.plan import _read_rows

    names = pq.read_schema(_write(tmp_path / "t2i.parquet", _rows("t2i"))).names
    assert set(REQUIRED_COLUMNS) <= set(names)
    slot_columns = [n for n in names if n.startswith(("source_", "ref_")) and n != "source_uri"]
    assert not slot_columns and not [n for n in names if n.endswith(("_vit", "_std"))]
    assert not {"system", "question", "answer", "target_vit_shape", "target_vit_grid"} & set(names)
    i2t = pq.read_schema(_write(tmp_path / "i2t.parquet", _rows("i2t"))).names
    assert "target_vae" not in i2t and "target_vae_shape" not in i2t and "answer" in i2t
    empty = pq.read_schema(_write(tmp_path / "empty.parquet", [])).names
    assert set(empty) == set(REQUIRED_COLUMNS)

    # the readers: training rows, the plan's scan
    data = DataSection(caption_dropout=0.0, condition_dropout=0.0)
    row = shard_rows(pq.read_table(tmp_path / "t2i.parquet"))[0]
    assert slot_visual(row, "source", tiny_cfg) is None and "source_vae" not in row
    sample = row_to_sample(row, tokenizer, tiny_cfg, data, random.Random(0))
    assert sample.has_gen
    qa = shard_rows(pq.read_table(tmp_path / "i2t.parquet"))[0]
    assert row_to_sample(qa, tokenizer, tiny_cfg, data, random.Random(0)).num_tokens > 0
    plan = _read_rows(str(tmp_path / "i2t.parquet"), data, CLASS_COLUMNS, list)
    assert plan[0] == ("i2t", None, None)
    assert shard_counts(pq.read_table(tmp_path / "i2t.parquet"))["classes"] == {"i2t||0": len(plan)}

    # a folder of shards whose columns differ: one schema over them all
    files = [str(tmp_path / f"{n}.parquet") for n in ("t2i", "i2t", "empty")]
    schema = dataset_schema([pq.read_schema(f) for f in files])
    table = pads.dataset(files, schema=schema).to_table()
    assert table.num_rows == 6 and {"target_vae", "target_vit", "answer"} <= set(table.schema.names)


# ------------------------------------------------------------------------------------------ no project code
def _readme_snippet() -> str:
    """The snippet of docs/data.md (linked from the README) that reads a shard with pyarrow and numpy alone."""
    text = (ROOT / "docs" / "data.md").read_text()
    section = text.split("## Reading shards without this project", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_snippet_reads_a_shard_without_project_code(tmp_path):
    path = _write(tmp_path / "part-00000.parquet", _rows("t2v", count=4))
    code = _readme_snippet().replace("runs/latents/shards/part-00000.parquet", str(path))
    code += ("\nimport sys\n"
             "assert not [m for m in sys.modules if m.split('.')[0] in ('lance_core', 'pipelines')]\n"
             "print(json.dumps([list(x.shape) for x in latents]), [str(x.dtype) for x in latents][0])\n")
    run = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    *_, last = run.stdout.strip().splitlines()
    shapes, dtype = last.rsplit(" ", 1)
    assert json.loads(shapes) == [[1 + k, 2 + k, 3, 48] for k in range(4)] and dtype == "float16"


def test_pyarrow_numpy_and_pandas_give_usable_arrays(tmp_path):
    rows = _rows("i2i", count=3)
    path = _write(tmp_path / "i2i.parquet", rows)
    table = pq.read_table(path)
    values = table.column("source_vit").to_numpy()
    shapes = table.column("source_vit_shape").to_pylist()
    for value, shape, row in zip(values, shapes, rows):
        assert value.dtype == np.float16
        assert np.array_equal(np.asarray(value).reshape(shape).astype(np.float32), _bf16(row["source_vit"]))
    frame = pd.read_parquet(path)
    for i, row in enumerate(rows):
        latents = np.asarray(frame.target_vae[i]).reshape(frame.target_vae_shape[i])
        assert np.array_equal(latents.astype(np.float32), _bf16(row["target_vae"]))
    assert frame.target_width.tolist() == [96, 97, 98] and frame.caption[0] == "caption 0"


def test_duckdb_reads_the_tensors_and_the_metadata(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    rows = _rows("t2v", count=2) + _rows("i2t", count=2)
    _write(tmp_path / "a.parquet", rows[:2])
    _write(tmp_path / "b.parquet", rows[2:], "fp32")
    got = duckdb.sql(f"SELECT sample_id, target_vae, target_vae_shape, target_vit FROM read_parquet("
                     f"'{tmp_path}/*.parquet', union_by_name = true) ORDER BY sample_id").fetchall()
    by_id = {r[0]: r for r in got}
    for row in rows[:2]:
        latents = np.array(by_id[row["sample_id"]][1], dtype=np.float32).reshape(by_id[row["sample_id"]][2])
        assert np.array_equal(latents, _bf16(row["target_vae"]))
    for row in rows[2:]:
        assert np.allclose(np.array(by_id[row["sample_id"]][3]), row["target_vit"].numpy().reshape(-1))
    query = f"SELECT key FROM parquet_kv_metadata('{tmp_path}/a.parquet')"
    keys = {k for (k,) in duckdb.sql(query).fetchall()}
    assert {b"lance_shard_schema", b"lance.columns", b"lance.latents"} <= keys


# ---------------------------------------------------------------------------------------------- version 1
def _legacy_row(row: dict) -> dict:
    """A row as version-1 shards stored it: raw bfloat16 bytes, shape and dtype columns, every column."""
    out = {k: v for k, v in row.items() if not isinstance(v, torch.Tensor)}
    for name, value in row.items():
        if isinstance(value, torch.Tensor):
            out[name] = tensor_to_bytes(value, "bfloat16")
            out[name.removesuffix("_std") + "_shape"] = list(value.shape)
            out[name.split("_v")[0] + "_vae_dtype"] = "bfloat16"
    return out


def test_version_1_shards_still_read_into_the_same_arrays(tmp_path, tokenizer, tiny_cfg):
    from pipelines.train.config import DataSection
    from pipelines.train.data import iter_rows, slot_latents

    rows = _rows("i2i") + _rows("t2v", std=True)
    old = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([_legacy_row(r) for r in rows], schema=LEGACY_SCHEMA), old)
    new = _write(tmp_path / "new.parquet", rows)
    assert check_schema(pq.read_schema(old), str(old)) == 1
    assert check_schema(pq.read_schema(new), str(new)) == 2
    data = DataSection()
    old_rows = [r for _, r in iter_rows(str(old), 0, data)]
    new_rows = [r for _, r in iter_rows(str(new), 0, data)]
    for a, b in zip(old_rows, new_rows):
        for name in ("target_vae", "target_vae_std", "source_vae", "source_vit"):
            if b.get(name) is None:
                assert a.get(name) is None
                continue
            assert a[name].dtype == np.float32 and np.array_equal(a[name], b[name].astype(np.float32)), name
        assert torch.equal(slot_latents(a, "target", 48), slot_latents(b, "target", 48))


def test_a_foreign_or_newer_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="foreign.parquet: not a latent shard, column 'sample_id'"):
        check_schema(pa.schema([pa.field("id", pa.int64())]), "foreign.parquet")
    newer = shard_table(_rows("t2i")).schema
    newer = newer.with_metadata({**newer.metadata, b"lance_shard_schema": b"9"})
    with pytest.raises(ValueError, match="next.parquet: latent shard schema version 9"):
        check_schema(newer, "next.parquet")
    wrong = shard_table(_rows("t2i")).schema
    wrong = wrong.set(wrong.get_field_index("target_vae"), pa.field("target_vae", pa.binary()))
    with pytest.raises(ValueError, match="'target_vae' has type binary"):
        check_schema(wrong, "wrong.parquet")
