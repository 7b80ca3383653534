"""Table, goal checks, JSON and chart of an accuracy run (:mod:`ttaserve.bench.accuracy`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ttaserve.adapters import DEFAULT_POLICY
from ttaserve.bench.accuracy import iter_rows
from ttaserve.bench.charts import draw

__all__ = ["check_goals", "table", "write"]

_ADAPTIVE_EXCLUDED = {"source", "generalist"}


def _cell(result: dict[str, Any], stream: str, batch: int) -> dict[str, Any] | None:
    return next((c for c in result["cells"] if c["stream"] == stream and c["batch"] == batch), None)


def _error(result: dict[str, Any], stream: str, batch: int, row: str, key: str = "mean_error") -> Any:
    """A row's value in a cell (a float, or a list for per_round), None if not measured."""
    cell = _cell(result, stream, batch)
    return cell["rows"].get(row, {}).get(key) if cell else None


def _column(cell: dict[str, Any]) -> str:
    return f"{cell['stream']} b{cell['batch']}"


def table(result: dict[str, Any]) -> str:
    """Markdown: mean error (%) over corruptions, one row per policy, one column per cell;
    then the continual stream's error per round."""
    cells = result["cells"]
    lines = ["| policy | " + " | ".join(_column(c) for c in cells) + " |",
             "|---|" + "---:|" * len(cells)]
    for row in iter_rows(result):
        values = [c["rows"].get(row, {}).get("mean_error") for c in cells]
        lines.append(f"| {row} | " + " | ".join(_fmt(v) for v in values) + " |")
    lines += _extra_table(result, "clean_error", "clean images (no corruption), same streams: error (%)")
    lines += _extra_table(result, "unseen_error",
                          "corruptions the T3 generalist never saw in training (blur, weather, digital): mean error (%)")
    for cell in (c for c in cells if c["stream"] == "continual"):
        rounds = max(len(v.get("per_round", [])) for v in cell["rows"].values())
        lines += ["", f"continual, batch {cell['batch']}: error per round (%)", "",
                  "| policy | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | resets |",
                  "|---|" + "---:|" * (rounds + 1)]
        for row in (r for r in iter_rows(result) if r in cell["rows"]):
            v = cell["rows"][row]
            lines.append(f"| {row} | " + " | ".join(_fmt(e) for e in v["per_round"])
                         + f" | {v['resets'] if v['resets'] is not None else '-'} |")
    return "\n".join(lines)


def _extra_table(result: dict[str, Any], key: str, title: str) -> list[str]:
    """A table of one more per-cell value (rows x the cells that have it), or nothing."""
    cells = [c for c in result["cells"] if any(v.get(key) is not None for v in c["rows"].values())]
    if not cells:
        return []
    lines = ["", title, "", "| policy | " + " | ".join(_column(c) for c in cells) + " |",
             "|---|" + "---:|" * len(cells)]
    for row in iter_rows(result):
        lines.append(f"| {row} | " + " | ".join(_fmt(c["rows"].get(row, {}).get(key)) for c in cells) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _goal(name: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": name, "met": met, "detail": detail}


def check_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The accuracy goals (docs/BENCHMARKS.md "Accuracy") on this result (``met`` is None when not measured)."""
    return [*default_goals(result), _composition_goal(result), _iid_goal(result), _dirichlet_goal(result),
            _batch1_goal(result), _continual_goal(result), _mixed_goal(result)]


_DEFAULT_STREAMS = ("iid", "dirichlet(0.01)", "sorted", "continual", "mixed")
_CORRELATED = ("dirichlet(0.01)", "sorted")


def default_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The server's default policy: never more than 1 point worse than source on any stream
    (clean images included), iid within 1.15x of tbn's iid error, label-correlated within
    1.2x of tbn's iid error, at every batch size measured."""
    name = DEFAULT_POLICY
    cells = [c for c in r["cells"] if c["stream"] in _DEFAULT_STREAMS and name in c["rows"] and "source" in c["rows"]]
    if not cells:
        return [_goal(f"default policy {name}: goals", None, "not measured")]
    worse, tbn_ratio = [], []
    for c in cells:
        for key, label in (("mean_error", ""), ("clean_error", " clean")):
            mine, source = c["rows"][name].get(key), c["rows"]["source"].get(key)
            if mine is not None and source is not None:
                worse.append((f"{_column(c)}{label}", mine - source))
        tbn_iid = _error(r, "iid", c["batch"], "tbn")
        if c["stream"] in ("iid", *_CORRELATED) and tbn_iid:
            tbn_ratio.append((c["stream"], c["batch"], c["rows"][name]["mean_error"] / tbn_iid))
    bad = [f"{k} {d:+.1f}" for k, d in worse if d > 1.0]
    iid = [(b, q) for s, b, q in tbn_ratio if s == "iid"]
    corr = [(s, b, q) for s, b, q in tbn_ratio if s != "iid"]
    return [
        _goal(f"default {name}: never worse than source by more than 1 point (every stream, clean too)",
              not bad, f"worst {max(d for _, d in worse):+.1f} points; over 1: {bad or 'none'}"),
        _goal(f"default {name}: iid within 1.15x of tbn's iid error", all(q <= 1.15 for _, q in iid) if iid else None,
              "; ".join(f"b{b} {q:.2f}x" for b, q in iid) or "not measured"),
        _goal(f"default {name}: dirichlet(0.01)/sorted within 1.2x of tbn's iid error",
              all(q <= 1.2 for *_, q in corr) if corr else None,
              "; ".join(f"{s} b{b} {q:.2f}x" for s, b, q in corr) or "not measured"),
    ]


def _composition_goal(r: dict[str, Any]) -> dict[str, Any]:
    """Reported either way: does adanpc over a normalization policy beat both parts alone?"""
    name = "composition: NORM+adanpc vs NORM and adanpc alone (reported, not a target)"
    parts = []
    for norm in ("graded-bn", "alpha-bn"):
        for stream in ("iid", "sorted"):
            values = [_error(r, stream, 64, k) for k in (f"{norm}+adanpc", norm, "adanpc")]
            if None not in values:
                both, alone, knn = values
                parts.append(f"{norm}+adanpc {stream} b64 {both:.1f} vs {norm} {alone:.1f}, adanpc {knn:.1f}"
                             f" ({'beats both' if both < min(alone, knn) else 'does not beat both'})")
    return _goal(name, None, "; ".join(parts) or "not measured")


def _iid_goal(r: dict[str, Any]) -> dict[str, Any]:
    name = "iid b64: every adaptive policy below source; alpha-bn/tbn <= half of source"
    cell = _cell(r, "iid", 64)
    if cell is None or "source" not in cell["rows"]:
        return _goal(name, None, "not measured")
    source = cell["rows"]["source"]["mean_error"]
    above = [k for k, v in cell["rows"].items() if k not in _ADAPTIVE_EXCLUDED and v["mean_error"] >= source]
    half = [k for k in ("alpha-bn", "tbn") if k in cell["rows"] and cell["rows"][k]["mean_error"] > source / 2]
    detail = (f"source {source:.1f}; not below source: {above or 'none'}; "
              f"alpha-bn/tbn above {source / 2:.1f}: {half or 'none'}")
    return _goal(name, not above and not half, detail)


def _dirichlet_goal(r: dict[str, Any]) -> dict[str, Any]:
    name = "dirichlet(0.01) b64: unmix-tns within 5 points of its iid error; tbn and tent degrade"
    pairs = {k: (_error(r, "iid", 64, k), _error(r, "dirichlet(0.01)", 64, k)) for k in ("unmix-tns", "tbn", "tent")}
    if any(a is None or b is None for a, b in pairs.values()):
        return _goal(name, None, "not measured")
    gap = {k: b - a for k, (a, b) in pairs.items()}  # type: ignore[operator]
    met = abs(gap["unmix-tns"]) <= 5 and gap["tbn"] > 10 and gap["tent"] > 10
    detail = "; ".join(f"{k} {a:.1f} -> {b:.1f} ({gap[k]:+.1f})" for k, (a, b) in pairs.items())  # type: ignore[str-format]
    return _goal(name, met, detail + " (degrade = more than 10 points worse)")


def _batch1_goal(r: dict[str, Any]) -> dict[str, Any]:
    name = "iid b1: unmix-tns and adanpc beat source"
    values = {k: _error(r, "iid", 1, k) for k in ("source", "unmix-tns", "adanpc")}
    if any(v is None for v in values.values()):
        return _goal(name, None, "not measured")
    met = values["unmix-tns"] < values["source"] and values["adanpc"] < values["source"]  # type: ignore[operator]
    return _goal(name, met, "; ".join(f"{k} {v:.1f}" for k, v in values.items()))


def _continual_goal(r: dict[str, Any]) -> dict[str, Any]:
    name = "continual b64: ecotta last round <= first; tent (guard) never ends worse than source"
    eco = _error(r, "continual", 64, "ecotta", "per_round")
    tent = _error(r, "continual", 64, "tent", "per_round")
    source = _error(r, "continual", 64, "source", "per_round")
    if not eco or not tent or not source:
        return _goal(name, None, "not measured")
    met = eco[-1] <= eco[0] and tent[-1] <= source[-1]
    noguard = _error(r, "continual", 64, "tent-noguard", "per_round")
    detail = (f"ecotta rounds {[round(e, 1) for e in eco]}; tent rounds {[round(e, 1) for e in tent]}; "
              f"source {source[-1]:.1f}" + (f"; tent-noguard {[round(e, 1) for e in noguard]}" if noguard else ""))
    return _goal(name, met, detail)


def _mixed_goal(r: dict[str, Any]) -> dict[str, Any]:
    name = "mixed b64: t3 <= the better of its two models; t3-b within 1 point of t3"
    values = {k: _error(r, "mixed", 64, k) for k in ("source", "generalist", "t3", "t3-b")}
    if any(v is None for v in values.values()):
        return _goal(name, None, "not measured")
    best = min(values["source"], values["generalist"])  # type: ignore[type-var]
    met = values["t3"] <= best and abs(values["t3-b"] - values["t3"]) <= 1  # type: ignore[operator]
    return _goal(name, met, "; ".join(f"{k} {v:.1f}" for k, v in values.items()))


def write(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` (if matplotlib is
    installed) under ``out``; returns the paths written."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = {**result, "goals": check_goals(result)}
    paths = {"json": folder / "accuracy.json", "table": folder / "accuracy.md", "chart": folder / "accuracy.png"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    goals = "\n".join(f"- [{_mark(g['met'])}] {g['goal']}: {g['detail']}" for g in result["goals"])
    paths["table"].write_text(f"Mean error (%) over corruptions, severity {result['config']['severity']}\n\n"
                              f"{table(result)}\n\nGoals\n\n{goals}\n")
    if draw(paths["chart"], lambda plt, path: plot(plt, result, path)) is None:
        del paths["chart"]
    return paths


def _mark(met: bool | None) -> str:
    return {True: "x", False: " ", None: "?"}[met]


def plot(plt: Any, result: dict[str, Any], path: Path) -> None:
    """Left: error per policy per stream (heat map). Right: error over time on the continual
    stream (one point per corruption block, rounds separated)."""
    rows = list(iter_rows(result))
    cells = result["cells"]
    continual = next((c for c in cells if c["stream"] == "continual"), None)
    fig, axes = plt.subplots(1, 2 if continual else 1, figsize=(18 if continual else 10, 0.45 * len(rows) + 3),
                             squeeze=False)
    _heatmap(axes[0][0], rows, cells)
    if continual:
        _curves(axes[0][1], continual, result["config"]["corruptions"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(ax: Any, rows: list[str], cells: list[dict[str, Any]]) -> None:
    import numpy as np

    grid = np.array([[c["rows"].get(r, {}).get("mean_error", np.nan) for c in cells] for r in rows], dtype=float)
    image = ax.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cells)), [_column(c) for c in cells], rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, _fmt(value), ha="center", va="center", fontsize=8)
    ax.set_title("mean error (%) over corruptions")
    ax.figure.colorbar(image, ax=ax, fraction=0.03)


def _curves(ax: Any, cell: dict[str, Any], corruptions: list[str]) -> None:
    colors = matplotlib_colors(len(cell["rows"]))
    ordered = [(r, cell["rows"][r]) for r in iter_rows({"cells": [cell]})]
    for (row, values), color in zip(ordered, colors):
        style = "--" if row in _ADAPTIVE_EXCLUDED or row.endswith("noguard") else "-"
        ax.plot(range(len(values["curve"])), values["curve"], style, label=row, linewidth=1.2, color=color)
    blocks = len(corruptions)
    rounds = len(next(iter(cell["rows"].values()))["per_round"])
    for r in range(1, rounds):
        ax.axvline(r * blocks - 0.5, color="grey", linewidth=0.8)
    ticks = list(range(0, blocks * rounds))
    ax.set_xticks(ticks, [corruptions[t % blocks].split("_")[0] for t in ticks], rotation=90, fontsize=7)
    ax.set_ylabel("error (%) in the block")
    ax.set_title(f"continual stream, batch {cell['batch']}: {rounds} rounds, no reset")
    ax.legend(fontsize=7, ncol=2)


def matplotlib_colors(count: int) -> list[Any]:
    """Distinct colors for up to 20 lines (the default cycle repeats after 10)."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return [palette(i % 20) for i in range(count)]


def merge(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same setup that split the grid (by rows or by cells), e.g.
    run in parallel. Sizes, seed, severity, split and corruptions must agree."""
    keys = ("seed", "n", "n_small", "n_continual", "rounds", "severity", "split", "corruptions")
    first = documents[0]
    for other in documents[1:]:
        differing = [k for k in keys if other["config"][k] != first["config"][k]]
        if differing:
            raise ValueError(f"cannot merge runs whose {', '.join(differing)} differ")
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for document in documents:
        for cell in document["cells"]:
            key = (cell["stream"], cell["batch"])
            cells.setdefault(key, {**cell, "rows": {}})["rows"].update(cell["rows"])
    rows = {r["label"]: r for d in documents for r in d["config"]["rows"]}
    config = {**first["config"], "rows": list(rows.values()), "cells": [
        {"stream": s, "batch": b} for s, b in cells]}
    return {**first, "config": config, "cells": list(cells.values()),
            "seconds": sum(d["seconds"] for d in documents), "merged_from": len(documents)}
