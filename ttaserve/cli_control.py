"""``ttaserve policy ...`` and ``ttaserve sessions ...``: tables for people, --json for scripts.

Every leaf command takes the shared flags (``--url``, ``--token``, ``--json``,
``--log-level``) before or after its name (:mod:`ttaserve.cli_args`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict

from ttaserve.cli_args import output_flags, param_arg, server_flags


def add_commands(sub: Any) -> None:
    _add_policy(sub)
    _add_sessions(sub)
    _add_policies_alias(sub)


def _add_policy(sub: Any) -> None:
    shared = [server_flags()]
    policy = sub.add_parser("policy", help="list, show or change the adaptation policies of a running server",
                            parents=shared)
    psub = policy.add_subparsers(dest="action", required=True)
    listing = psub.add_parser("list", parents=shared, help="policies the server offers, with parameters "
                              "(--local: those of this installation, no server needed)")
    listing.add_argument("--local", action="store_true",
                         help="list this installation's policies without asking a server")
    get = psub.add_parser("get", parents=shared, help="a model's default policy, or one sequence's")
    get.add_argument("model")
    get.add_argument("--sequence", help="sequence id (default: the model's default policy)")
    get.add_argument("--owner", default="", help="principal owning the sequence (admin; default: yours)")
    put = psub.add_parser("set", parents=shared,
                          help="set a model's default policy, or switch one sequence (resets it)")
    put.add_argument("model")
    put.add_argument("policy")
    put.add_argument("--sequence", help="sequence id (default: the model's default for new sessions)")
    put.add_argument("--param", dest="params", action="append", type=param_arg, default=[],
                     metavar="KEY=VALUE", help="policy parameter; VALUE is JSON or plain text")
    put.add_argument("--owner", default="", help="principal owning the sequence (admin; default: yours)")
    policy.set_defaults(run=_policy)


def _add_sessions(sub: Any) -> None:
    shared = [server_flags()]
    sessions = sub.add_parser("sessions", help="inspect, reset, snapshot or restore adaptation sessions",
                              parents=shared)
    ssub = sessions.add_subparsers(dest="action", required=True)
    listing = ssub.add_parser("list", parents=shared, help="live sessions with policy, counters and drift")
    listing.add_argument("--model", default="")
    listing.add_argument("--owner", default="", help="only this principal's sessions (admin)")
    for name, text in (("show", "drift signals and counters of one session"),
                       ("reset", "restore a session's initial state"),
                       ("snapshot", "write a session's state to a file"),
                       ("restore", "load a session's state from a file")):
        p = ssub.add_parser(name, parents=shared, help=text)
        p.add_argument("model")
        p.add_argument("sequence")
        p.add_argument("--owner", default="", help="principal owning the sequence (admin; default: yours)")
        if name in ("snapshot", "restore"):
            p.add_argument("file", help="snapshot file")
    sessions.set_defaults(run=_sessions)


def _add_policies_alias(sub: Any) -> None:
    # Kept for scripts written before 'policy list --local' existed; says where it went.
    p = sub.add_parser("policies", parents=[output_flags()],
                       help="same as 'ttaserve policy list --local'")
    p.set_defaults(run=_policies_alias, action="list", local=True)


def _policies_alias(args: argparse.Namespace) -> int:
    print("note: 'ttaserve policies' is 'ttaserve policy list --local' ('ttaserve policy list' "
          "asks a running server)", file=sys.stderr)
    return _policy(args)


def _client(args: argparse.Namespace) -> Any:
    from ttaserve.client import ControlClient

    return ControlClient(args.url, args.token)


def _emit(args: argparse.Namespace, message: Any, table: str) -> None:
    if args.json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
    else:
        print(table)


def _policy_line(info: Any) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(info.params_json.items())) or "-"
    seq = info.sequence_id.WhichOneof("kind")
    scope = f"sequence {getattr(info.sequence_id, seq)}" if seq else "default"
    return f"{info.model} ({scope}): {info.policy}  [{params}]"


def _policy(args: argparse.Namespace) -> int:
    if args.action == "list" and args.local:
        from ttaserve.server.control import list_policies

        _emit_policies(args, list_policies())
        return 0
    client = _client(args)
    if args.action == "list":
        _emit_policies(args, client.list_policies())
    elif args.action == "get":
        info = client.get_policy(args.model, args.sequence, args.owner)
        _emit(args, info, _policy_line(info))
    else:
        info = client.set_policy(args.model, args.policy, dict(args.params), args.sequence, args.owner)
        _emit(args, info, _policy_line(info))
    return 0


def _emit_policies(args: argparse.Namespace, response: Any) -> None:
    rows = [(p.name, ", ".join(f"{q.name}={json.loads(q.default_json)}" for q in p.parameters) or "-",
             p.description) for p in response.policies]
    _emit(args, response, _table(("POLICY", "PARAMETERS", "DESCRIPTION"), rows))


def _fallbacks(info: Any) -> str:
    """Safety-net fallbacks, with a mark while the session is answered by the source model."""
    return f"{info.fallbacks}{' (on source)' if info.on_source else ''}"


def _sessions(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "list":
        response = client.list_sessions(args.model, args.owner)
        rows = [(s.model, s.owner, _seq(s.sequence_id), s.policy, s.batches, s.samples, f"{s.drift_score:.3f}",
                 f"{s.entropy:.3f}", s.resets, _fallbacks(s), f"{s.idle_seconds:.0f}s") for s in response.sessions]
        _emit(args, response, _table(("MODEL", "OWNER", "SEQUENCE", "POLICY", "BATCHES", "SAMPLES", "DRIFT",
                                      "ENTROPY", "RESETS", "FALLBACKS", "IDLE"), rows))
    elif args.action == "show":
        detail = client.describe(args.model, args.sequence, args.owner)
        lines = [f"{detail.info.model} sequence {args.sequence}: {detail.info.policy}, "
                 f"{detail.info.batches} batches, {detail.info.samples} samples, "
                 f"{detail.info.state_bytes} bytes of state"]
        lines += [f"  {k:<24} {v:.4f}" for k, v in sorted(detail.signals.items())]
        lines += [f"  resets[{k}] = {v}" for k, v in sorted(detail.resets_by_reason.items())]
        lines += [f"  fallbacks[{k}] = {v}" for k, v in sorted(detail.fallbacks_by_reason.items())]
        if detail.info.on_source:
            lines.append("  answered by the source model (safety-net cooldown)")
        _emit(args, detail, "\n".join(lines))
    elif args.action == "reset":
        info = client.reset(args.model, args.sequence, args.owner)
        _emit(args, info, f"reset {info.model} sequence {args.sequence} ({info.policy})")
    elif args.action == "snapshot":
        data = client.snapshot(args.model, args.sequence, args.owner)
        with open(args.file, "wb") as f:
            f.write(data)
        print(f"wrote {len(data)} bytes to {args.file}", file=sys.stderr)
    else:
        with open(args.file, "rb") as f:
            info = client.restore(args.model, args.sequence, f.read(), args.owner)
        _emit(args, info, f"restored {info.model} sequence {args.sequence} ({info.policy}, {info.batches} batches)")
    return 0


def _seq(ref: Any) -> str:
    kind = ref.WhichOneof("kind")
    return str(getattr(ref, kind)) if kind else "(stream)"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    cells = [header, *[tuple(str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
