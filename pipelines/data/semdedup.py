"""Semantic dedup over committed shards, after SemDedup (Abbas et al., 2023): the normalised CLIP image
embeddings stored by the scoring stage (``filters.semantic_dedup``) are clustered with spherical k-means,
and inside each cluster a row whose cosine similarity to an earlier row in plan order (partition, then row
of the shard) reaches ``filters.semantic_dedup_threshold`` is dropped; the earliest of a group is kept.

    lance precompute --semantic-dedup [--config ...] --input URI --output URI

runs (or resumes) the precompute with embeddings stored, then this pass. The shards stay as written: the pass
writes ``semantic_drop.parquet`` (:data:`~lance_core.shards.SEMANTIC_DROP_FILE`) beside the manifest, whole,
and training leaves its rows out. Running it again redoes it over the shards committed by then.

Pairs that k-means puts in different clusters are not compared (the price of not comparing all pairs); rows
without an embedding are kept. The pass holds every embedding in memory (rows x dim x 4 bytes).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lance_core.shards import SEMANTIC_DROP_FILE
from pipelines.runtime.storage import filesystem, join_uri, with_retries

from .config import PrecomputeConfig
from .writer import put_whole, read_commits

CLUSTER_ROWS = 1000
"""Rows per cluster when ``filters.semantic_dedup_clusters`` is not given."""
KMEANS_ITERATIONS = 10
BLOCK_ROWS = 2048
"""Rows whose similarities are computed at once (bounds the memory of a large cluster)."""
DROP_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("duplicate_of", pa.string()),
                         pa.field("cosine", pa.float32()), pa.field("cluster", pa.int32()),
                         pa.field("partition", pa.int64())])
"""``partition``: the partition whose shard holds the dropped row (training reads only those shards)."""


@dataclass
class SemanticDedupResult:
    path: str
    rows: int
    """Rows of the committed shards."""
    embedded: int
    """Rows with an embedding (the others are kept)."""
    clusters: int
    dropped: int


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cat([(x[s:s + BLOCK_ROWS] @ centroids.T).argmax(dim=1) for s in range(0, len(x), BLOCK_ROWS)])


def _seed_centroids(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii, 2007) with the cosine distance 1 - cos: each next
    centroid is, of 2 + ln k rows drawn with probability proportional to their squared distance to the nearest
    centroid so far, the one that leaves the smallest sum of squared distances."""
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = (1 - x @ x[chosen[0]]).clamp(min=0)
    for _ in range(1, k):
        weights = nearest ** 2
        if float(weights.sum()) <= 0:
            break
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        after = torch.minimum(nearest[:, None], (1 - x @ x[candidates].T).clamp(min=0))
        best = int((after ** 2).sum(dim=0).argmin())
        chosen.append(int(candidates[best]))
        nearest = after[:, best]
    return x[chosen].clone()


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """Cluster of each row of ``x`` (n, d), unit rows: k-means on cosine similarity, seeded by k-means++ from
    ``seed``, the centroids renormalised after each mean; a cluster left empty keeps its centroid."""
    generator = torch.Generator().manual_seed(seed)
    centroids = _seed_centroids(x, max(1, min(k, len(x))), generator)
    assignment = _nearest(x, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        filled = torch.bincount(assignment, minlength=k) > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
        moved = _nearest(x, centroids)
        if torch.equal(moved, assignment):
            break
        assignment = moved
    return assignment


def semantic_duplicates(x: torch.Tensor, threshold: float, clusters: int,
                        seed: int = 0) -> list[tuple[int, int, float, int]]:
    """(row, earlier row it repeats, cosine, cluster) of each row of ``x`` (n, d; unit rows in plan order)
    whose similarity to some earlier row of its cluster is at least ``threshold``, the most similar named."""
    assignment = spherical_kmeans(x, clusters, seed=seed)
    found = []
    for cluster in torch.unique(assignment).tolist():
        members = torch.nonzero(assignment == cluster).flatten()  # ascending: plan order
        emb = x[members]
        for start in range(1, len(members), BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, len(members))
            sims = emb[start:stop] @ emb[:stop].T
            later_or_self = torch.arange(stop)[None, :] >= torch.arange(start, stop)[:, None]
            best, earlier = sims.masked_fill(later_or_self, -2.0).max(dim=1)
            for k in torch.nonzero(best >= threshold).flatten().tolist():
                found.append((int(members[start + k]), int(members[earlier[k]]), float(best[k]), cluster))
    return sorted(found)


def _shard_embeddings(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sample ids, rows with an embedding, their embeddings (m, d) float32) of one shard's columns."""
    ids = table.column("sample_id").to_pylist()
    if "clip_embedding" not in table.schema.names:
        return ids, np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    column = table.column("clip_embedding").combine_chunks()
    valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return ids, valid, values.reshape(len(valid), -1) if len(valid) else values.reshape(0, 0)


def load_embeddings(output: str, cfg: PrecomputeConfig
                    ) -> tuple[list[str], list[int], torch.Tensor, list[int], list[int]]:
    """(every sample id in plan order, positions of those with an embedding, the embeddings renormalised,
    partitions read, the partition of each sample id) of the shards committed under ``output``."""
    fs = filesystem(output, cfg.storage)
    commits = read_commits(output, cfg)
    ids: list[str] = []
    owners: list[int] = []
    positions: list[int] = []
    blocks: list[np.ndarray] = []
    for partition in sorted(commits):
        path = join_uri(output, commits[partition]["shard"])

        def read(path=path):
            with fs.open(path, "rb") as fh:
                shard = pq.ParquetFile(fh)
                names = [n for n in ("sample_id", "clip_embedding") if n in shard.schema_arrow.names]
                return shard.read(columns=names)

        shard_ids, valid, emb = _shard_embeddings(with_retries(f"reading {path}", cfg.storage, read))
        positions += (valid + len(ids)).tolist()
        ids += shard_ids
        owners += [partition] * len(shard_ids)
        if len(valid):
            blocks.append(emb)
    x = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.zeros(0, 1)
    return ids, positions, torch.nn.functional.normalize(x, dim=1), sorted(commits), owners


def run_semantic_dedup(cfg: PrecomputeConfig) -> SemanticDedupResult:
    """The pass over the shards committed under ``cfg.output``; writes the drop list whole."""
    f = cfg.filters
    ids, positions, x, partitions, owners = load_embeddings(cfg.output, cfg)
    clusters = f.semantic_dedup_clusters or max(1, math.ceil(len(x) / CLUSTER_ROWS))
    found = semantic_duplicates(x, f.semantic_dedup_threshold, clusters) if len(x) else []
    table = pa.table({"sample_id": [ids[positions[i]] for i, _, _, _ in found],
                      "duplicate_of": [ids[positions[j]] for _, j, _, _ in found],
                      "cosine": [c for _, _, c, _ in found], "cluster": [k for _, _, _, k in found],
                      "partition": [owners[positions[i]] for i, _, _, _ in found]},
                     schema=DROP_SCHEMA)
    summary = {"threshold": f.semantic_dedup_threshold, "clusters": clusters, "rows": len(ids),
               "embedded": len(x), "dropped": len(found), "partitions": partitions, "clip_model": f.clip_model}
    table = table.replace_schema_metadata({"lance.semantic_dedup": json.dumps(summary)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    fs = filesystem(cfg.output, cfg.storage)
    path = join_uri(cfg.output, SEMANTIC_DROP_FILE)
    with_retries(f"writing {cfg.output}", cfg.storage, lambda: put_whole(fs, path, buffer.getvalue()))
    return SemanticDedupResult(path, len(ids), len(x), clusters, len(found))


def print_semantic_summary(result: SemanticDedupResult) -> None:
    print(f"  semantic dedup: {result.rows} rows, {result.embedded} with a CLIP embedding, {result.clusters} "
          f"clusters; {result.dropped} dropped as near-identical to an earlier row -> {result.path}")
