"""Semantic dedup (pipelines/data/semdedup.py) on planted embeddings: spherical k-means finds the planted
clusters, and inside them exactly the near-identical copies are dropped, each pointing at the earlier row it
repeats; training's plan leaves the dropped rows out (the pipeline run: tests/test_precompute_scores.py)."""

from __future__ import annotations

import torch

from pipelines.data.semdedup import semantic_duplicates, spherical_kmeans


def _planted(seed: int = 0, groups: int = 5, per_group: int = 40, dim: int = 32):
    """Unit rows around ``groups`` far-apart centres (pairwise cosine about 0.6 inside a group), then near-
    identical copies (cosine > 0.999) of some of them, interleaved later in plan order. Returns the rows,
    the group of each, and copy row -> original row."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=gen), dim=1)
    rows, group_of = [], []
    for g in range(groups):
        for _ in range(per_group):
            rows.append(centres[g] + 0.13 * torch.randn(dim, generator=gen))
            group_of.append(g)
    copies = {}
    for original in torch.randperm(len(rows), generator=gen)[:12].tolist():
        copies[len(rows)] = original
        rows.append(rows[original] + 0.002 * torch.randn(dim, generator=gen))
        group_of.append(group_of[original])
    x = torch.nn.functional.normalize(torch.stack(rows), dim=1)
    return x, torch.tensor(group_of), copies


def test_spherical_kmeans_recovers_planted_groups():
    x, groups, _ = _planted()
    assignment = spherical_kmeans(x, 5, seed=1)
    for g in range(5):
        assert len(set(assignment[groups == g].tolist())) == 1, "a planted group was split"
    assert len(set(assignment.tolist())) == 5


def test_only_the_planted_copies_are_dropped_and_the_earlier_row_is_kept():
    x, _, copies = _planted()
    for clusters in (1, 5, 12):
        found = semantic_duplicates(x, threshold=0.95, clusters=clusters)
        assert {row: earlier for row, earlier, _, _ in found} == copies, clusters
        assert all(cos >= 0.95 and earlier < row for row, earlier, cos, _ in found)
    # a copy of a copy points at the earliest of the group: rows are compared with every earlier one
    chain = torch.cat([x, x[[0]], x[[0]]])
    found = semantic_duplicates(chain, threshold=0.95, clusters=5)
    assert [(row, earlier) for row, earlier, _, _ in found if row >= len(x)] == [(len(x), 0), (len(x) + 1, 0)]
