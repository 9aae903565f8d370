"""The end-of-run summary table of the precompute job: per stage the inputs in / out, the drops by reason and
the seconds spent, then the throughput; the verdict on a run that wrote nothing; the progress lines of a run
without progress bars; the per-partition lists of the records a run dropped (``quarantine/`` and
``filtered/``), each record with its stage, reason and media."""

from __future__ import annotations

import time

import pandas as pd
import pyarrow as pa

from lance_core.shards import QUARANTINE_SCHEMA

DROPPED_SCHEMA = QUARANTINE_SCHEMA.append(pa.field("media", pa.string()))
"""A row of ``quarantine/part-N.parquet`` or ``filtered/part-N.parquet``: ``source_uri`` (the input record: a
manifest or Parquet row, a tar member's key, a media file), ``partition``, ``stage``, ``reason``, ``error``
(empty for a filtered record) and ``media``: the media the record names, a URL or path (``https://...``,
``s3://...``, a file beside the manifest), a tar member (``00000.tar#s7.jpg``) or the Parquet column holding
the bytes; a record of several media names the target first, then ``source=...``, ``ref_0=...``."""
DROPPED_FOLDERS = ("quarantine", "filtered")


def dropped_table(rows: pd.DataFrame, partition: int, reasons: dict[int, str] | None = None,
                  stage: str = "") -> pa.Table:
    """The list of a partition's dropped records, one row each (:data:`DROPPED_SCHEMA`), from their rows of
    the pipeline; ``reasons`` (record -> reason, at ``stage``) in place of the rows' own stage and reason (the
    duplicates the writer finds among rows that passed every stage)."""

    def column(name: str) -> list:
        return [str(v or "") for v in rows[name]] if name in rows else [""] * len(rows)

    stages, causes = column("stage"), column("reason")
    if reasons is not None:
        stages = [stage] * len(rows)
        causes = [reasons[int(r)] for r in rows["record_index"]]
    return pa.table({"source_uri": column("source_uri"), "partition": [partition] * len(rows),
                     "stage": stages, "reason": causes, "error": column("error"), "media": column("media")},
                    schema=DROPPED_SCHEMA)


STAGES = ("read", "caption", "decode", "size", "duration", "motion", "score", "clip", "text", "dedup", "vae", "vit")
"""Stages in the order an input record meets them (``read`` also covers missing files)."""


def stage_rows(stats: dict) -> list[tuple[str, int, int, str, float]]:
    """(stage, in, out, dropped by reason, seconds) for every stage; each record is dropped at most once."""
    dropped = {**stats["filtered_by_reason"], **stats["quarantined_by_reason"]}
    remaining = stats["inputs"]
    rows = []
    for stage in STAGES:
        reasons = {k.split(":", 1)[1]: v for k, v in dropped.items() if k.startswith(stage + ":")}
        out = remaining - sum(reasons.values())
        text = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "-"
        rows.append((stage, remaining, out, text, stats["stage_seconds"].get(stage, 0.0)))
        remaining = out
    return rows


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def nothing_written(stats: dict, output: str) -> str | None:
    """Why the output holds no record although its inputs had some, else None: the drops by ``stage:reason``,
    quarantined then filtered. The stats are those of the whole output, so a rerun that found every partition
    committed by a run that wrote records passes, and one of a run that wrote none fails as that run did."""
    if not stats["inputs"] or stats["inputs_written"]:
        return None
    parts = [f"{kind} {_reasons(counts)}" for kind, counts in (("quarantined", stats["quarantined_by_reason"]),
                                                                 ("filtered", stats["filtered_by_reason"])) if counts]
    message = (f"no record was written: all {stats['inputs']} inputs were dropped ({'; '.join(parts) or 'no reason'}"
               f"); each is listed with its reason and media, the quarantined ones with their error, in "
               f"{output.rstrip('/')}/quarantine and {output.rstrip('/')}/filtered")
    if "caption:missing_caption" in stats["filtered_by_reason"]:
        message += "; a caption missing everywhere usually means another column holds it: manifest.caption_column"
    return message


def print_summary(result) -> None:
    s = result.stats
    print(f"\nprecompute: {result.output}")
    if result.complete_before:
        print(f"  complete: all {result.partitions} partitions were committed by an earlier run; nothing ran now "
              "and the figures below are that run's (--overwrite starts afresh)")
    print(f"  partitions  planned {s['partitions_planned']}, committed {s['partitions_committed']} "
          f"(this run {result.committed_now}, skipped as already committed {result.skipped})")
    print(f"  inputs      {s['inputs']} = written {s['inputs_written']} + filtered {s['inputs_filtered']} "
          f"+ quarantined {s['inputs_quarantined']}")
    if s["inputs_filtered"] or s["inputs_quarantined"]:
        where = result.output.rstrip("/")
        print(f"  dropped     each record with its reason and media: {where}/filtered, {where}/quarantine")
    print(f"  samples     {s['samples_written']} written, {s['bytes_written'] / 2**20:.2f} MiB")
    table = [("stage", "in", "out", "seconds", "dropped by reason")]
    table += [(stage, str(n_in), str(n_out), f"{seconds:.2f}", reasons)
              for stage, n_in, n_out, reasons, seconds in stage_rows(s)]
    width = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for row in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, width)))
    rate = s["samples_written"] / s["wall_seconds"] if s["wall_seconds"] else 0.0
    runs = "the runs that committed partitions" if result.skipped else "this run"
    print(f"  wall {s['wall_seconds']:.1f} s ({runs}), {rate:.1f} samples/s")


PROGRESS_LINES = 10
PROGRESS_EVERY_MAX = 100
"""A run without progress bars logs about PROGRESS_LINES lines, one every tenth of its partitions, and at
least one every PROGRESS_EVERY_MAX partitions."""


class PartitionProgress:
    """The progress of a run without progress bars (``--no-progress``): a line every ``every`` partitions
    committed by this run, and one at its last, with the totals of this run so far."""

    def __init__(self, todo: int, planned: int, every: int | None = None) -> None:
        self.todo, self.planned = todo, planned
        self.every = every or max(1, min(PROGRESS_EVERY_MAX, todo // PROGRESS_LINES))
        self.done = self.inputs = self.written = self.samples = 0
        self.started = time.perf_counter()

    def note(self, record: dict) -> str | None:
        """Count one commit record; the line to print when it is time for one, else None."""
        self.done += 1
        self.inputs += record["inputs"]
        self.written += record["inputs_written"]
        self.samples += record["rows"]
        if self.done % self.every and self.done != self.todo:
            return None
        return (f"committed {self.done}/{self.todo} partitions of this run ({self.planned} planned): "
                f"{self.written} of {self.inputs} inputs written, {self.samples} samples, "
                f"{time.perf_counter() - self.started:.0f} s")
