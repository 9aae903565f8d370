import torch

from lance_core.positions import SpanPosition, base_position_ids, position_ids


def test_text_then_image_then_text_follows_qwen_rules():
    spans = [SpanPosition(3, "text"), SpanPosition(6, "vit", (1, 2, 3)), SpanPosition(2, "text")]
    ids = position_ids(spans, mape=False)
    assert ids[:, :3].tolist() == [[0, 1, 2]] * 3
    # image grid (1, 2, 3) at base 3: t = 3, h = 3 + i, w = 3 + j
    assert ids[0, 3:9].tolist() == [3] * 6
    assert ids[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert ids[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    # next text starts one past the largest id so far (5)
    assert ids[:, 9:].tolist() == [[6, 7]] * 3


def test_video_temporal_step_and_next_run_after_max():
    spans = [SpanPosition(1, "text"), SpanPosition(8, "vit", (4, 1, 2), temporal_step=2.0), SpanPosition(1, "text")]
    ids, cursor = base_position_ids(spans)
    assert ids[0, 1:9].tolist() == [1, 1, 3, 3, 5, 5, 7, 7]
    assert ids[:, 9].tolist() == [8, 8, 8]
    assert cursor == 9


def test_mape_vit_span_starts_at_1000_and_text_keeps_its_index():
    spans = [SpanPosition(2, "text"), SpanPosition(4, "vit", (1, 2, 2)), SpanPosition(2, "text")]
    base = position_ids(spans, mape=False)
    ids = position_ids(spans, mape=True)
    assert ids[0, 2] == 1000
    assert ids[0, 2:6].tolist() == [1000] * 4
    assert torch.equal(ids[1:, 2:6], base[1:, 2:6])  # only the temporal axis moves
    assert torch.equal(ids[:, 6:], base[:, 6:])


def test_mape_reference_span_starts_at_2000():
    spans = [SpanPosition(1, "text"), SpanPosition(8, "reference", (2, 2, 2)), SpanPosition(1, "text"),
             SpanPosition(4, "target", (1, 2, 2))]
    ids = position_ids(spans, mape=True)
    assert ids[0, 1] == 2000
    assert ids[0, 1:9].tolist() == [2000] * 4 + [2002] * 4
    base = position_ids(spans, mape=False)
    assert torch.equal(ids[:, 9:], base[:, 9:])  # t2i-style target untouched


def test_mape_edit_target_copies_source_ids():
    spans = [SpanPosition(2, "text"), SpanPosition(4, "vit", (1, 2, 2)), SpanPosition(1, "text"),
             SpanPosition(6, "source", (1, 2, 3)), SpanPosition(3, "text"), SpanPosition(6, "target", (1, 2, 3))]
    ids = position_ids(spans, mape=True)
    source = ids[:, 7:13]
    target = ids[:, 16:22]
    assert torch.equal(source, target)
    assert not torch.equal(position_ids(spans, mape=False)[:, 16:22], source)


def test_mape_edit_different_sizes_keeps_target_ids():
    spans = [SpanPosition(1, "text"), SpanPosition(4, "source", (1, 2, 2)), SpanPosition(1, "text"),
             SpanPosition(6, "target", (1, 2, 3))]
    assert torch.equal(position_ids(spans, mape=True)[:, 6:], position_ids(spans, mape=False)[:, 6:])
