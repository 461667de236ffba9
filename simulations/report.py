"""A run's result as files: JSON (everything), CSV (per-node completion, origin bytes over
time, per-node upload utilisation over time), and a one-screen summary. Plots are in
``plots.py`` so that the numbers do not need matplotlib."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def summary(result: dict) -> dict:
    """Completion statistics beside the bound; the ratios are to T_min."""
    t_min = result["bound"]["t_min_seconds"]
    done = [n["seconds"] for n in result["nodes"] if n["seconds"] is not None]
    expected = [n for n in result["nodes"] if not n["aborted"]]
    out = {"t_min_seconds": t_min, "nodes": len(result["nodes"]),
           "completed": len(done), "expected": len(expected)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
        value = percentile(done, q)
        out[f"{name}_seconds"] = value
        out[f"{name}_over_t_min"] = None if value is None else value / t_min
    p50, p99 = out["p50_seconds"], out["p99_seconds"]
    out["p99_over_p50"] = None if not p50 else p99 / p50
    out["origin_bytes_over_size"] = result["origin_bytes"] / result["size_bytes"]
    return out


def format_summary(result: dict) -> str:
    s = summary(result)
    stats = result["stats"]
    lines = [
        f"{result['scenario']} ({result['engine']} engine, seed {result['seed']}): "
        f"{s['completed']}/{s['expected']} nodes done",
        f"  T_min {s['t_min_seconds']:.3f} s  (terms: " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["bound"]["terms_seconds"].items()) + ")",
    ]
    if s["completed"]:
        lines.append("  completion  " + "  ".join(
            f"{name} {s[name + '_seconds']:.3f} s ({s[name + '_over_t_min']:.3f}x)"
            for name in ("p50", "p90", "p99", "max")))
        lines.append(f"  p99/p50 {s['p99_over_p50']:.3f}")
    lines.append(f"  origin bytes {s['origin_bytes_over_size']:.3f} x F")
    wall = stats["wall_seconds"]
    if "transfers" in stats:
        lines.append(f"  {stats['transfers']:,} chunk transfers, {stats['events']:,} events, "
                     f"{stats['busy']:,} busy answers in {wall:.2f} s of wall time "
                     f"({stats['transfers'] / max(wall, 1e-9) * 60:,.0f} transfers per "
                     "wall-minute)")
    else:
        lines.append(f"  {stats.get('steps', 0):,} steps over {stats.get('classes', 0)} "
                     f"classes in {wall:.4f} s of wall time")
    return "\n".join(lines)


def compact(result: dict) -> dict:
    """The result for JSON: per-node utilisation over time only as its mean per sample (the
    whole matrix is in upload_utilisation.csv), plus the summary."""
    series = dict(result["series"])
    series["upload_utilisation"] = [
        (start, end, sum(util) / len(util) if util else 0.0)
        for start, end, util in series["upload_utilisation"]]
    return {**result, "series": series, "summary": summary(result)}


def write(result: dict, out: Path) -> list[Path]:
    """Write the JSON and CSV files of ``result`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "result.json"
    path.write_text(json.dumps(compact(result), indent=1))
    written.append(path)
    path = out / "nodes.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        columns = ["node", "group", "rack", "arrival", "finish", "seconds", "aborted",
                   "origin_bytes", "peer_bytes", "uploaded_bytes"]
        writer.writerow(columns)
        for node in result["nodes"]:
            writer.writerow([node[c] for c in columns])
    written.append(path)
    path = out / "origin.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["start", "end", "bytes", "bytes_per_second"])
        for start, end, nbytes in result["series"]["origin"]:
            writer.writerow([start, end, nbytes, nbytes / (end - start) if end > start else 0])
    written.append(path)
    series = result["series"]["upload_utilisation"]
    if series:
        path = out / "upload_utilisation.csv"
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["node"] + [f"{start:.6g}" for start, _, _ in series])
            for i, node in enumerate(result["nodes"]):
                writer.writerow([node["node"]] + [f"{util[i]:.4f}" for _, _, util in series])
        written.append(path)
    return written
