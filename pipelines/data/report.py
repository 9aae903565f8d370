"""The end-of-run summary table of the precompute job."""

from __future__ import annotations


def print_summary(result) -> None:
    s = result.stats
    print(f"\nprecompute: {result.output}")
    print(f"  partitions  planned {s['partitions_planned']}, committed {s['partitions_committed']} "
          f"(this run {result.committed_now}, skipped as already committed {result.skipped})")
    print(f"  inputs      {s['inputs']} = written {s['inputs_written']} + filtered {s['inputs_filtered']} "
          f"+ quarantined {s['inputs_quarantined']}")
    print(f"  samples     {s['samples_written']} written, {s['bytes_written'] / 2**20:.2f} MiB")
    rows = [("stage", "seconds", "dropped by reason")]
    dropped = {**{k: v for k, v in s["filtered_by_reason"].items()},
               **{k: v for k, v in s["quarantined_by_reason"].items()}}
    for stage in ("read", "decode", "caption", "size", "duration", "motion", "score", "clip", "text", "dedup",
                  "vae", "vit"):
        reasons = ", ".join(f"{k.split(':', 1)[1]}={v}" for k, v in dropped.items() if k.startswith(stage + ":"))
        rows.append((stage, f"{s['stage_seconds'].get(stage, 0.0):.2f}", reasons or "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, width)))
    rate = s["samples_written"] / s["wall_seconds"] if s["wall_seconds"] else 0.0
    print(f"  wall {s['wall_seconds']:.1f} s, {rate:.1f} samples/s")
