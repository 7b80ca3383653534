"""Table, goal checks, JSON and chart of a perf run (:mod:`ttaserve.bench.perf`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttaserve.bench.charts import draw

__all__ = ["GOALS", "check_goals", "shown", "table", "write"]

# docs/BENCHMARKS.md "Performance": largest overhead (policy time / source time) at batch 64, in-process.
GOALS = {"alpha-bn": 1.10, "unmix-tns": 1.35, "adanpc": 1.30, "t3-b": 3.3, "ecotta": 2.5, "tent": 3.0}
GRPC_GOAL = 0.85  # gRPC throughput / in-process throughput
SESSIONS_GOAL = 2.0  # 32 concurrent sequences / one at a time
SESSIONS_DIFF = 1e-5  # responses vs each sequence alone


def shown(value: float, goal: float | None, digits: int = 2) -> str:
    """``value`` with as many decimals (up to 6) as it takes not to print the goal itself
    when it is not the goal: 0.847 against a goal of 0.85, never "0.85 ... NO"."""
    text = f"{value:.{digits}f}"
    while goal is not None and value != goal and float(text) == goal and digits < 6:
        digits += 1
        text = f"{value:.{digits}f}"
    return text


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def overhead_table(result: dict[str, Any]) -> list[str]:
    sizes = list(result["overhead"])
    head = "| policy | " + " | ".join(f"b{b} engine | b{b} raw" for b in sizes) + " | goal (b64) |"
    lines = [head, "|---|" + "---:|" * (2 * len(sizes) + 1)]
    for policy in result["overhead"][sizes[-1]]["policies"]:
        cells = []
        for b in sizes:
            row = result["overhead"][b]["policies"].get(policy, {})
            cells += [_x(row.get("engine", {}).get("median")), _x(row.get("raw", {}).get("median"))]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {_x(GOALS.get(policy))} |")
    source = [_source_row(result["overhead"][b]) for b in sizes]
    lines += ["", "source per batch (ms), forward / through the engine: " + "; ".join(
        f"b{b} {s['source_raw_ms']:.2f} / {s['source_engine_ms']:.2f} "
        f"(engine {s['source_engine_vs_forward']['median']:.2f}×)" for b, s in zip(sizes, source))]
    return lines


def _source_row(cell: dict[str, Any]) -> dict[str, Any]:
    """The source policy's own timings at one batch size (results written before they had
    their own entry carry them in every policy's row)."""
    return cell.get("source") or next(iter(cell["policies"].values()))


def memory_table(result: dict[str, Any]) -> list[str]:
    memory = result["memory"]
    batch = next(iter(memory.values()))["batch"]
    lines = [f"| policy | state (fresh) | state (steady) | guard | snapshot | peak step b{batch} (engine) | "
             "peak step (adapter) |", "|---|" + "---:|" * 6]
    for policy, m in memory.items():
        lines.append(f"| {policy} | {_mib(m['state_bytes_initial'])} | {_mib(m['state_bytes_steady'])} | "
                     f"{_mib(m['guard_bytes'])} | {_mib(m['snapshot_bytes'])} | "
                     f"{_mib(m['peak_step_bytes_engine'])} | {_mib(m['peak_step_bytes_raw'])} |")
    return lines


def server_lines(result: dict[str, Any]) -> list[str]:
    g, s = result.get("grpc"), result.get("sessions")
    if g is None or s is None:
        return ["(server parts not run)"]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in s["max_abs_diff_vs_isolated"].items())
    return [
        f"gRPC (tritonclient, batch {g['batch']}, source, one request at a time): "
        f"{g['grpc_img_s']:.0f} img/s vs in-process {g['inprocess_img_s']:.0f} img/s -> {g['ratio']:.2f} "
        f"(quartiles of the per-round ratio {g['ratio_iqr'][0]:.2f}-{g['ratio_iqr'][1]:.2f}); per request: "
        f"client {1e3 * g['batch'] / g['grpc_img_s']:.1f} ms, in the server "
        f"{g['server_ms_per_request']['request']:.1f} ms (queue {g['server_ms_per_request']['queue']:.1f}, "
        f"compute {g['server_ms_per_request']['compute']:.1f}); in-process {1e3 * g['batch'] / g['inprocess_img_s']:.1f} ms",
        f"{s['sequences']} sequences × batch {s['batch']} ({s['policy']}): one at a time "
        f"{s['sequential_img_s']:.0f} img/s, concurrent {s['concurrent_img_s']:.0f} img/s "
        f"({s['concurrent_vs_sequential']:.2f}×), concurrent + batching {s['batched_img_s']:.0f} img/s "
        f"({s['batched_vs_sequential']:.2f}×, {s['batched_mean_forward_images']:.0f} images per forward)",
        f"max |response - sequence alone|: {diffs}",
    ]


def onnx_table(result: dict[str, Any]) -> list[str]:
    """ONNX Runtime / torch per policy (the source row is the plain forward), and the
    policies' overheads on ONNX Runtime."""
    onnx = result.get("onnx")
    if not onnx:
        return ["(ONNX Runtime part not run)"]
    if onnx.get("status") != "ok":
        return [f"ONNX Runtime part not run: {onnx.get('reason')}"]
    sizes = list(onnx["vs_torch"])
    lines = [f"ONNX Runtime {onnx['onnxruntime']} ({', '.join(onnx['providers'])}, {onnx['threads']} thread(s)) "
             "/ torch on the same batches (< 1: ORT faster); ms per batch ORT vs torch, bare forward", "",
             "| policy | " + " | ".join(f"b{b} raw | b{b} engine | b{b} ms (raw)" for b in sizes) + " |",
             "|---|" + "---:|" * (3 * len(sizes))]
    for policy in onnx["policies"]:
        cells = []
        for b in sizes:
            row = onnx["vs_torch"][b]["policies"][policy]
            cells += [_x(row["raw"]["median"]), _x(row["engine"]["median"]),
                      f"{row['ort_raw_ms']:.2f} vs {row['torch_raw_ms']:.2f}"]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "overhead on ONNX Runtime = policy time / ORT source time", "",
              "| policy | " + " | ".join(f"b{b} engine | b{b} raw" for b in sizes) + " |",
              "|---|" + "---:|" * (2 * len(sizes))]
    for policy in onnx["policies"][1:]:
        cells = []
        for b in sizes:
            row = onnx["overhead"][b]["policies"][policy]
            cells += [_x(row["engine"]["median"]), _x(row["raw"]["median"])]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def table(result: dict[str, Any]) -> str:
    """Markdown: overhead ratios, source times, server throughput, memory, goals."""
    m = result["machine"]
    lines = [f"machine: {m['nproc']} cores, load {m['load_avg_start'][0]:.1f} -> "
             f"{m.get('load_avg_end', [float('nan')])[0]:.1f}, torch {m['torch']} with "
             f"{m['torch_threads']} thread(s); data: {result['data']}", "",
             "overhead = time per batch / source time per batch (median of paired repetitions)", ""]
    lines += overhead_table(result) + [""] + server_lines(result) + [""] + memory_table(result)
    lines += [""] + onnx_table(result)
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {_met(g['met'])} |" for g in result["goals"]]
    return "\n".join(lines)


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "NO")


def check_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance goals (docs/BENCHMARKS.md "Performance") on this result (``met`` None when not measured).
    Overhead goals are checked on the engine path (what a client gets) and the raw path."""
    goals = []
    b64 = result["overhead"].get("64", {}).get("policies", {})
    for policy, target in GOALS.items():
        row = b64.get(policy)
        if row is None:
            goals.append({"goal": f"{policy} ≤ {target}× at b64", "measured": "not measured", "met": None})
            continue
        engine, raw = row["engine"]["median"], row["raw"]["median"]
        goals.append({"goal": f"{policy} ≤ {target}× at b64",
                      "measured": f"engine {shown(engine, target)}×, raw {shown(raw, target)}×",
                      "met": engine <= target and raw <= target})
    grpc, sessions = result.get("grpc"), result.get("sessions")
    goals.append({"goal": f"gRPC ≥ {GRPC_GOAL:.0%} of in-process", "measured": "not measured" if not grpc
                  else shown(grpc["ratio"], GRPC_GOAL), "met": None if not grpc else grpc["ratio"] >= GRPC_GOAL})
    if sessions:
        worst = max(sessions["max_abs_diff_vs_isolated"].values())
        ratio = sessions["batched_vs_sequential"]
        goals.append({"goal": f"many sessions ≥ {SESSIONS_GOAL}× sequential, responses within {SESSIONS_DIFF}",
                      "measured": f"{shown(ratio, SESSIONS_GOAL)}×, max diff {worst:.1e}",
                      "met": ratio >= SESSIONS_GOAL and worst <= SESSIONS_DIFF})
    memory = result["memory"]
    if "ecotta" in memory and "tent" in memory:
        eco, tent = memory["ecotta"]["peak_step_bytes_raw"], memory["tent"]["peak_step_bytes_raw"]
        goals.append({"goal": "peak step memory: ecotta < tent", "measured": f"{_mib(eco)} vs {_mib(tent)}",
                      "met": eco < tent})
    return goals


def write(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """perf.json, perf.md and perf.png (if matplotlib is installed) under ``out_dir``;
    returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "perf.json", "table": out / "perf.md", "chart": out / "perf.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["table"].write_text(table(result) + "\n")
    if draw(paths["chart"], lambda plt, path: _chart(plt, result, path)) is None:
        del paths["chart"]
    return paths


def _chart(plt: Any, result: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _overhead_chart(axes[0][0], result, "engine")
    _overhead_chart(axes[0][1], result, "raw")
    _server_chart(axes[1][0], result)
    _memory_chart(axes[1][1], result)
    fig.suptitle(f"ttaserve bench perf ({result['machine']['nproc']} cores, "
                 f"{result['machine']['torch_threads']} torch thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overhead_chart(ax: Any, result: dict[str, Any], mode: str) -> None:
    sizes = list(result["overhead"])
    policies = [p for p in result["overhead"][sizes[-1]]["policies"] if p != "source"]
    width = 0.8 / len(sizes)
    for k, b in enumerate(sizes):
        rows = result["overhead"][b]["policies"]
        values = [rows.get(p, {}).get(mode, {}).get("median", 0.0) for p in policies]
        ax.bar([i + k * width for i in range(len(policies))], values, width, label=f"batch {b}")
    for i, p in enumerate(policies):
        if p in GOALS:
            ax.plot([i - 0.1, i + 0.9 - 0.1], [GOALS[p]] * 2, "k--", lw=1)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(policies))], policies, rotation=30)
    ax.set_ylabel("time / source time")
    ax.set_title(f"overhead vs source ({mode}); dashed: goal at b64")
    ax.legend()


def _server_chart(ax: Any, result: dict[str, Any]) -> None:
    g, s = result.get("grpc"), result.get("sessions")
    if not g or not s:
        ax.set_axis_off()
        return
    labels = ["in-process b64", "gRPC b64", "32 seq: one at a time", "32 seq: concurrent", "32 seq: batched"]
    values = [g["inprocess_img_s"], g["grpc_img_s"], s["sequential_img_s"], s["concurrent_img_s"], s["batched_img_s"]]
    ax.bar(labels, values, color=["C0", "C0", "C1", "C1", "C1"])
    ax.set_ylabel("images / s")
    ax.set_title("serving throughput")
    ax.tick_params(axis="x", rotation=20)


def _memory_chart(ax: Any, result: dict[str, Any]) -> None:
    memory = result["memory"]
    names = list(memory)
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [max(m["state_bytes_steady"], 1) / 2**20 for m in memory.values()], 0.4, label="state per session")
    ax.bar([i + 0.2 for i in xs], [max(m["peak_step_bytes_raw"], 1) / 2**20 for m in memory.values()], 0.4, label="peak of one step")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=30)
    ax.set_ylabel("MiB")
    ax.set_title("memory per policy")
    ax.legend()
