"""PNG plots of a run and of a sweep; every plot shows T_min beside the result."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _bound_line(ax, t_min: float, vertical: bool = True) -> None:
    draw = ax.axvline if vertical else ax.axhline
    draw(t_min, color="black", linestyle="--", linewidth=1, label=f"T_min {t_min:.3g} s")


def plot_run(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    t_min = result["bound"]["t_min_seconds"]
    title = f"{result['scenario']} ({result['engine']})"
    paths = []

    done = sorted(n["seconds"] for n in result["nodes"] if n["seconds"] is not None)
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        ax.step(done, [(k + 1) / len(result["nodes"]) for k in range(len(done))],
                where="post", label="nodes done")
    _bound_line(ax, t_min)
    ax.set_xlabel("seconds since the node started")
    ax.set_ylabel("share of nodes done")
    ax.set_title(f"completion CDF: {title}")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    paths.append(_save(fig, out / "completion_cdf.png"))

    series = result["series"]["origin"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if series:
        xs, ys = [], []
        for start, end, nbytes in series:
            rate = nbytes / (end - start) / 1e6 if end > start else 0
            xs += [start, end]
            ys += [rate, rate]
        ax.plot(xs, ys, label="origin egress")
    _bound_line(ax, t_min)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB/s")
    ax.set_title(f"origin egress: {title}\n{result['origin_bytes'] / result['size_bytes']:.3f}"
                 " x F in all")
    ax.legend(loc="upper right")
    paths.append(_save(fig, out / "origin_egress.png"))

    util = result["series"]["upload_utilisation"]
    if util:
        fig, ax = plt.subplots(figsize=(6, 4))
        mids = [(start + end) / 2 for start, end, _ in util]
        means = [sum(u) / len(u) for _, _, u in util]
        lows = [sorted(u)[len(u) // 10] for _, _, u in util]
        highs = [sorted(u)[len(u) * 9 // 10] for _, _, u in util]
        ax.fill_between(mids, lows, highs, alpha=0.3, label="p10-p90 of nodes")
        ax.plot(mids, means, label="mean")
        _bound_line(ax, t_min)
        ax.set_xlabel("seconds")
        ax.set_ylabel("upload used / upload link")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"upload utilisation: {title}")
        ax.legend(loc="lower left")
        paths.append(_save(fig, out / "upload_utilisation.png"))
    return paths


def plot_sweep(param: str, rows: list[dict], out: Path, name: str) -> Path:
    """Completion (p50, p99, max) and T_min against the swept value; a second axis for
    origin bytes / F."""
    labels = [str(row["value"]) for row in rows]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("p50_seconds", "o-"), ("p99_seconds", "s-"), ("max_seconds", "^-")):
        ax.plot(xs, [row[key] for row in rows], style, label=key.replace("_seconds", ""))
    ax.plot(xs, [row["t_min_seconds"] for row in rows], "k--", label="T_min")
    ax.set_xticks(xs, labels, rotation=30)
    ax.set_xlabel(param)
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(xs, [row["origin_bytes_over_size"] for row in rows], "r:", label="origin / F")
    ax2.set_ylabel("origin bytes / F", color="red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(f"{name}: sweep of {param}")
    return _save(fig, out / f"sweep_{param.replace('.', '_')}.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
