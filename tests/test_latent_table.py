"""The fixed 3D sin-cos latent position table against the values measured by running the Lance release
(``../shared/fixtures/lance_release/latent_pos_table.json``): full tables at hidden 24/48, the sha256 of
the float32 tables of ``Lance_3B`` (1 frame) and ``Lance_3B_Video`` (31 frames), sampled and full rows."""

import hashlib
import json
import math

import pytest
import torch

from lance_core.config import ConfigError, model_preset
from lance_core.model import build_model
from lance_core.model.embeddings import LatentPositionTable, latent_position_table, latent_table_blocks


@pytest.fixture(scope="module")
def release_table(shared_dir):
    path = shared_dir / "fixtures" / "lance_release" / "latent_pos_table.json"
    if not path.is_file():
        pytest.skip(f"release fixture {path.name} is not in ../shared/fixtures/lance_release")
    return json.loads(path.read_text())


def _blocks(hidden):
    t, h, w = latent_table_blocks(hidden)
    return {"t": [0, t], "h": [t, t + h], "w": [t + h, t + h + w]}


def _row(t, h, w, grid):
    return (t * grid + h) * grid + w


# ------------------------------------------------------------------------------------------ small tables
@pytest.mark.parametrize("index", range(4))
def test_small_tables_equal_the_release_exactly(release_table, index):
    case = release_table["small"][index]
    hidden, grid, frames = case["hidden_size"], case["max_latent_size"], case["max_latent_frames"]
    table = latent_position_table(hidden, grid, frames)
    assert list(table.shape) == case["shape"] and table.dtype == torch.float32
    assert _blocks(hidden) == case["blocks"]
    assert torch.equal(table, torch.tensor(case["values"], dtype=torch.float32))
    module = LatentPositionTable(hidden, grid, frames)
    assert torch.equal(module.pos_embed, table)


def test_lookup_follows_the_release_row_rule(release_table):
    """row = t·grid² + h·grid + w; the example gives the rows of a (2, 3, 4) latent grid in a 64-side table."""
    rule = release_table["row_index"]
    assert rule["rule"].startswith("row = t * max_latent_size**2 + h * max_latent_size + w")
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)
    module = LatentPositionTable(24, 64, 2)
    rows = rule["example_t2_h3_w4_max64"]
    assert [_row(*c, 64) for c in coords.tolist()] == rows
    assert torch.equal(module(coords), module.pos_embed[rows])


def test_lookup_refuses_coordinates_outside_the_table():
    module = LatentPositionTable(24, 4, 2)
    with pytest.raises(ValueError, match="exceeds the 4x4"):
        module(torch.tensor([[0, 4, 0]]))
    with pytest.raises(ValueError, match="2 latent frame.*max_latent_frames"):
        module(torch.tensor([[2, 0, 0]]))


# ------------------------------------------------------------------------------------------ released sizes
@pytest.mark.parametrize("index", [0, 1], ids=["Lance_3B", "Lance_3B_Video"])
def test_released_tables_hash_and_rows_equal_the_release(release_table, index):
    case = release_table["released"][index]
    rows, hidden = case["shape"]
    grid = 64
    frames = rows // (grid * grid)
    assert (frames, hidden) == ((1, 2048), (31, 2048))[index]
    assert _blocks(hidden) == case["blocks"]
    table = latent_position_table(hidden, grid, frames)
    assert list(table.shape) == case["shape"]
    assert hashlib.sha256(table.numpy().data).hexdigest() == case["float32_le_sha256"]
    assert table.min().item() == case["min"] and table.max().item() == case["max"]

    total = squares = 0.0
    norms = []
    for chunk in table.split(grid * grid):  # float64 per frame, frame by frame, as the fixture's note says
        chunk = chunk.double()
        total += chunk.sum().item()
        squares += chunk.square().sum().item()
        norms.append(chunk.norm(dim=1))
    norms = torch.cat(norms)
    assert math.isclose(total, case["sum"], rel_tol=1e-9)
    assert math.isclose(squares, case["sum_of_squares"], rel_tol=1e-9)
    assert math.isclose(norms.min().item(), case["row_norm_min"], rel_tol=1e-9)
    assert math.isclose(norms.max().item(), case["row_norm_max"], rel_tol=1e-9)

    columns = case["columns"]
    for sample in case["sampled_rows"]:
        row = _row(sample["t"], sample["h"], sample["w"], grid)
        assert row == sample["row"]
        assert table[row, columns].tolist() == sample["values_at_columns"], sample
        assert math.isclose(norms[row].item(), sample["norm"], rel_tol=1e-12)
    for full in case["full_rows"]:
        assert _row(full["t"], full["h"], full["w"], grid) == full["row"]
        assert table[full["row"]].tolist() == full["values"]
    if frames > 1:
        assert release_table["first_4096_rows_of_31_frame_table_equal_1_frame_table"]
        assert torch.equal(table[:grid * grid], latent_position_table(hidden, grid, 1))


def test_presets_size_the_table_by_their_frame_count():
    for preset, frames in (("lance-3b", 1), ("lance-3b-video", 31)):
        cfg = model_preset(preset)
        assert (cfg.max_latent_frames, cfg.latent_grid) == (frames, 64)
        table = build_model(cfg, device="meta").latent_pos_embed.pos_embed
        assert tuple(table.shape) == (frames * 64 * 64, 2048) and not table.requires_grad
    tiny = model_preset("tiny")
    model = build_model(tiny)
    expected = latent_position_table(tiny.hidden_size, tiny.latent_grid, tiny.max_latent_frames)
    assert torch.equal(model.latent_pos_embed.pos_embed, expected)


# ------------------------------------------------------------------------------------------ hidden sizes
def test_every_hidden_size_the_validator_accepts_builds():
    """Sizes the table cannot split (odd, or under 6) are refused naming hidden_size; all others build,
    4-indivisible ones included, and embed latent tokens."""
    accepted = []
    for hidden in [*range(1, 41), 66, 70, 130, 2050]:
        try:
            cfg = model_preset("tiny", hidden_size=hidden, vit={"out_hidden_size": hidden},
                               latent_grid=4, max_latent_frames=2)
        except ConfigError as err:
            assert "hidden_size" in str(err) and (hidden % 2 or hidden < 6), (hidden, err)
            continue
        accepted.append(hidden)
        model = build_model(cfg)
        coords = torch.tensor([[0, 0, 0], [1, 3, 2]])
        table = model.latent_pos_embed
        assert torch.equal(table(coords), latent_position_table(hidden, 4, 2)[[0, 16 + 12 + 2]])
        assert sum(latent_table_blocks(hidden)) == hidden
        assert model.time_embedder(torch.tensor([0.0, 0.5])).shape == (2, hidden)
    assert accepted == [*range(6, 41, 2), 66, 70, 130, 2050]


def test_unbuildable_sizes_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"hidden_size \(67\) must be even"):
        model_preset("tiny", hidden_size=67, vit={"out_hidden_size": 67})
    with pytest.raises(ConfigError, match=r"timestep_freq_dim \(255\) must be even"):
        model_preset("tiny", timestep_freq_dim=255)
    with pytest.raises(ConfigError, match=r"vit.hidden_size \(36\) / vit.num_heads \(2\)"):
        model_preset("tiny", vit={"hidden_size": 36})
