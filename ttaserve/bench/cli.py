"""``ttaserve bench ...``: the benchmark command group (results in docs/BENCHMARKS.md).

:func:`add_bench_commands` adds the ``bench`` parser and its subcommands; a new benchmark
adds one ``_add_<name>(group)`` function to ``_COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ttaserve.cli_args import logging_flags

__all__ = ["add_bench_commands"]


def _csv(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _add_accuracy(group: Any) -> None:
    p = group.add_parser(
        "accuracy", help="error of every policy on Fashion-MNIST-C streams", parents=[logging_flags()],
        description="Run every policy through the engine (or the server, --via-grpc) on "
        "corrupted Fashion-MNIST streams; write a table, a JSON file and a chart.")
    p.add_argument("--out", default="ttaserve-results", metavar="DIR",
                   help="where accuracy.json/.md/.png go (default ./ttaserve-results)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 corruptions, 200 images, batch 16, iid/dirichlet(0.01)/continual")
    p.add_argument("--seed", type=int, default=None, help="images, corruptions and streams (default 0)")
    p.add_argument("--n", type=int, default=None, help="images per corruption (default 600)")
    p.add_argument("--n-small", type=int, default=None, help="images per corruption at batch 1 (200)")
    p.add_argument("--n-continual", type=int, default=None,
                   help="images per corruption per continual round (400)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the continual stream (3)")
    p.add_argument("--severity", type=int, default=None, choices=range(1, 6), help="1-5 (default 5)")
    p.add_argument("--split", choices=("test", "train"), default=None,
                   help="images to corrupt: test (headline) or train (validation runs)")
    p.add_argument("--corruptions", type=_csv(str), default=None, help="comma-separated (default all 15)")
    p.add_argument("--streams", type=_csv(str), default=None,
                   help="comma-separated: iid, dirichlet(D), sorted, continual, mixed "
                   "(default iid,dirichlet(0.1),dirichlet(0.01),sorted,continual,mixed)")
    p.add_argument("--no-clean", dest="clean", action="store_false", default=None,
                   help="do not also run the per-corruption streams on clean images")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="comma-separated (default 64,16,1)")
    p.add_argument("--full-grid", action="store_true", default=None,
                   help="also run continual and mixed at the smaller batch sizes")
    p.add_argument("--policies", nargs="+", default=None, metavar="ROW",
                   help="rows: POLICY, NORM+PRED, POLICY(k=v,...), generalist, tent-noguard, "
                   "graded-bn-nosafety (default: all, plus graded-bn+adanpc and alpha-bn+adanpc)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--data", default=None, help="Fashion-MNIST idx directory (or $TTASERVE_DATA)")
    p.add_argument("--via-grpc", action="store_true", default=None,
                   help="send the streams through an in-process server with tritonclient")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: combine accuracy.json files of runs that split the grid")
    p.set_defaults(run=_accuracy)


def _accuracy_config(args: argparse.Namespace) -> Any:
    from ttaserve.bench.accuracy import Config, parse_row, quick_config
    from ttaserve.bench.corruptions import CORRUPTIONS
    from ttaserve.bench.streams import parse_stream

    base = quick_config() if args.quick else Config()
    fields = ("seed", "n", "n_small", "n_continual", "rounds", "severity", "split", "corruptions",
              "streams", "batch_sizes", "full_grid", "threads", "data", "via_grpc", "clean")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.policies:
        overrides["rows"] = tuple(parse_row(p) for p in args.policies)
    for name in overrides.get("corruptions", ()):
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    for stream in overrides.get("streams", ()):
        parse_stream(stream)
    return replace(base, **overrides)


def _accuracy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ttaserve.bench.accuracy import run, total_samples

    if args.merge:
        return _merge(args)
    config = _accuracy_config(args)
    interactive = sys.stderr.isatty()  # a log file gets a line every 30 s, not every batch
    with tqdm(total=total_samples(config), unit="img", disable=not args.progress, file=sys.stderr,
              dynamic_ncols=True, mininterval=0.2 if interactive else 30) as bar:
        shown = [""]

        def progress(done: int, label: str) -> None:
            if shown[0] != label:
                shown[0] = label
                bar.set_description(label, refresh=False)
            bar.update(done)

        result = run(config, progress)
    _report(result, args.out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ttaserve.bench.accuracy_report import merge

    _report(merge([json.loads(Path(p).read_text()) for p in args.merge]), args.out)
    return 0


def _report(result: dict[str, Any], out: str) -> None:
    from ttaserve.bench.accuracy_report import table, write

    paths = write(result, out)
    print(table(result))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))


def _add_perf(group: Any) -> None:
    p = group.add_parser(
        "perf", help="overhead, serving throughput and memory of every policy", parents=[logging_flags()],
        description="Time every policy against the source forward in-process (batch 1/16/64), "
        "gRPC against in-process, 32 concurrent sequences with and without dynamic batching, "
        "state and peak step memory, ONNX Runtime against torch; optionally peer servers (--peers). "
        "Writes perf.json/.md/.png.")
    p.add_argument("--out", default="ttaserve-results", metavar="DIR",
                   help="where perf.json/.md/.png go (default ./ttaserve-results)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1 and 16, 3 repetitions")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="comma-separated (default 1,16,64)")
    p.add_argument("--policies", type=_csv(str), default=None,
                   help="comma-separated (default all, graded-bn included, timed with the server's safety net)")
    p.add_argument("--reps", type=int, default=None, help="paired repetitions (default 9)")
    p.add_argument("--block", dest="block_s", type=float, default=None, metavar="SECONDS",
                   help="length of one timed source block (default 0.05)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the servers (default 1; 0 = torch's default)")
    p.add_argument("--adanpc-entries", type=int, default=None, help="AdaNPC source memory size (60000)")
    p.add_argument("--batch-delay-us", type=int, default=None, help="the batching server's delay (5000)")
    p.add_argument("--session-policy", default=None, help="policy of the 32 sequences (alpha-bn); comma-separated policies are "
                   "given to the sequences round robin, e.g. alpha-bn,unmix-tns,adanpc")
    p.add_argument("--no-server", dest="server", action="store_false", default=None,
                   help="in-process parts only (no gRPC, no many-sessions)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", default=None,
                   help="skip ONNX Runtime vs torch (part 6)")
    p.add_argument("--peers", action="store_true", default=None,
                   help="also run Triton/MLServer/TorchServe on the same model (needs .venv-peers)")
    p.add_argument("--peer-concurrency", dest="peer_concurrencies", type=_csv(int), default=None,
                   help="comma-separated client concurrencies for --peers")
    p.add_argument("--peer-duration", dest="peer_duration_s", type=float, default=None,
                   metavar="SECONDS", help="measured seconds per peer and concurrency")
    p.add_argument("--data", default=None, help="Fashion-MNIST idx directory (or $TTASERVE_DATA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_perf)


def _perf(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ttaserve.bench.perf import Config, quick_config, run, total_steps
    from ttaserve.bench.perf_report import table, write

    fields = ("batch_sizes", "policies", "reps", "block_s", "threads", "adanpc_entries", "batch_delay_us",
              "session_policy", "server", "peers", "peer_concurrencies", "peer_duration_s", "data", "onnx")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    config = replace(quick_config() if args.quick else Config(), **overrides)
    with tqdm(total=total_steps(config), unit="step", disable=not args.progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def progress(done: int, label: str) -> None:
            if not bar.disable and bar.desc != label:
                bar.set_description(label, refresh=False)
            bar.update(done)

        result = run(config, progress, args.out)
    paths = write(result, args.out)
    print(table(result))
    if "peers" in result and result["peers"].get("servers"):
        from ttaserve.bench.peers import format_table

        print("\n" + format_table(result["peers"]))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


_COMMANDS = (_add_accuracy, _add_perf)


def add_bench_commands(sub: Any) -> None:
    """Add ``bench`` (with every benchmark subcommand) to the top-level subparsers."""
    bench = sub.add_parser("bench", help="accuracy and performance benchmarks", parents=[logging_flags()],
                           description="The benchmarks of docs/BENCHMARKS.md: each prints a table and "
                           "writes JSON and a PNG chart.")
    group = bench.add_subparsers(dest="bench", required=True)
    for add in _COMMANDS:
        add(group)
