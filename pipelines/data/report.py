"""The end-of-run summary table of the precompute job: per stage the inputs in / out, the drops by reason and
the seconds spent, then the throughput."""

from __future__ import annotations

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
