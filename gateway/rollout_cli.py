"""`canary-gateway rollout start | status | pause | resume | abort | promote`: progressive delivery
through the admin API (router.rollout does the work in the gateway; this module asks and renders)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from gateway.admin_cli import Document, Result, call, count, parent_parsers, run, table
from gateway.errors import InvalidArgument
from gateway.protocol import admin as pb
from router.rules import format_percent, parse_percent

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """`60s`, `5m`, `1.5h`, `500ms` or plain seconds, as seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 60s, 5m, 1h or 500ms")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_steps(text: str) -> list[int]:
    """`1,5,25,50,100` (percentages, up to two decimals) as basis points."""
    try:
        return [parse_percent("steps", part.strip()) for part in text.split(",")]
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _gates(results: Any) -> list[Document]:
    return [{"gate": g.gate, "verdict": g.verdict, "summary": g.summary, "figures": dict(g.figures)} for g in results]


def _document(r: Any) -> Document:
    config = r.gates_config
    return {
        "id": r.id,
        "model": r.model,
        "baseline": r.baseline,
        "candidate": r.candidate,
        "state": r.state,
        "where": r.where,
        "step": r.step,
        "steps_percent": [bps / 100 for bps in r.steps_bps],
        "interval_s": r.interval_s,
        "shadow_s": r.shadow_s,
        "shadow_requests": r.shadow_requests,
        "step_shadow_percent": r.step_shadow_bps / 100,
        "max_extensions": r.max_extensions,
        "thresholds": {
            f.name: getattr(config, f.name) if not f.has_presence or config.HasField(f.name) else None
            for f in config.DESCRIPTOR.fields
        },
        "step_started_ns": r.step_started_ns,
        "step_elapsed_s": r.step_elapsed_s,
        "extensions": r.extensions,
        "gates": _gates(r.gates),
        "history": [
            {
                "phase": h.phase,
                "percent": h.bps / 100,
                "started_ns": h.started_ns,
                "ended_ns": h.ended_ns,
                "outcome": h.outcome,
                "extensions": h.extensions,
                "gates": _gates(h.gates),
            }
            for h in r.history
        ],
        "started_by": r.started_by,
        "reason": r.reason,
        "created_ns": r.created_ns,
        "outcome": r.outcome,
    }


def _gate_rows(gates: list[Document]) -> str:
    return table(("GATE", "VERDICT", "FIGURES"), ((g["gate"], g["verdict"].upper(), g["summary"]) for g in gates))


def _outcome_words(t: Document) -> str:
    """The outcome gates of a plan in a few words ("" : none)."""
    words = []
    if t["accuracy_not_worse_by"] is not None:
        words.append(f"accuracy -{t['accuracy_not_worse_by'] * 100:g} pp")
    if t["mae_not_worse_by"] is not None:
        words.append(f"MAE +{t['mae_not_worse_by']:g}")
    if t["max_equal_opportunity_gap_increase"] is not None:
        words.append(f"{t['fairness_attribute']} TPR gap +{t['max_equal_opportunity_gap_increase']:g}")
    return f"{', '.join(words)} (worse at {t['confidence']:.1%})" if words else ""


def _rollout_text(doc: Document) -> str:
    steps = ",".join(format_percent(round(p * 100)) for p in doc["steps_percent"])
    shadow = (
        f"shadow {doc['shadow_s']:g}s first, "
        if doc["shadow_s"]
        else f"shadow {doc['shadow_requests']} requests first, "
        if doc["shadow_requests"]
        else ""
    )
    t = doc["thresholds"]
    lines = [
        f"{doc['model']}: rollout #{doc['id']} of v{doc['candidate']} over v{doc['baseline']}: {doc['state'].upper()}"
        + (f" at {doc['where']}" if doc["state"] in ("running", "paused") else ""),
        f"  plan: {shadow}steps {steps}% every {doc['interval_s']:g}s (up to {doc['max_extensions']} extensions), "
        f"candidate shadows {doc['step_shadow_percent']:g}% during steps",
        f"  gates: >= {t['min_requests']} requests per side; error rate +{t['max_error_rate_delta'] * 100:g} pp and "
        f"OOD rate +{t['max_ood_rate_delta'] * 100:g} pp (Fisher exact, {t['confidence']:.1%}; early looks "
        f"{t['interim_confidence']:.1%}); p99 <= {t['max_p99_ratio']:g}x (slack {t['p99_slack_ms']:g} ms); "
        f"agreement >= {t['min_agreement']:.0%}",
    ]
    outcomes = _outcome_words(t)
    if outcomes:
        lines.append(f"  outcome gates: >= {t['min_labelled']} labelled requests per side; {outcomes}")
    lines.append(f"  started by {doc['started_by']}: {doc['reason']}")
    if doc["outcome"]:
        lines.append(f"  {doc['outcome']}")
    if doc["state"] == "running":
        extended = f", extended {doc['extensions']}x" if doc["extensions"] else ""
        lines.append(f"  current window: {doc['step_elapsed_s']:.1f}s{extended}")
    if doc["gates"]:
        lines.append(_gate_rows(doc["gates"]))
    if doc["history"]:
        rows = [
            (
                h["phase"],
                f"{h['percent']:g}%",
                f"{(h['ended_ns'] - h['started_ns']) / 1e9:.1f}s",
                h["outcome"],
                " ".join(f"{g['gate']}={g['verdict']}" for g in h["gates"]) or "-",
            )
            for h in doc["history"]
        ]
        lines.append("history:\n" + table(("PHASE", "SHARE", "LASTED", "OUTCOME", "GATES"), rows))
    return "\n".join(lines)


def _start(args: argparse.Namespace) -> Result:
    gates = pb.RolloutGates()
    for name in (
        "min_requests",
        "max_error_rate_delta",
        "max_p99_ratio",
        "p99_slack_ms",
        "max_ood_rate_delta",
        "min_agreement",
        "confidence",
        "min_labelled",
        "accuracy_not_worse_by",
        "mae_not_worse_by",
        "max_equal_opportunity_gap_increase",
        "fairness_attribute",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(gates, name, value)
    request = pb.StartRolloutRequest(
        model=args.model,
        candidate=args.candidate,
        steps_bps=args.steps,
        interval_s=args.interval,
        shadow_s=args.shadow_for or 0.0,
        shadow_requests=args.shadow_requests or 0,
        gates=gates,
        reason=args.reason,
    )
    if args.step_shadow is not None:
        request.step_shadow_bps = args.step_shadow
    if args.max_extensions is not None:
        request.max_extensions = args.max_extensions
    return _document(call(args, "StartRollout", request).rollout), _rollout_text


def _status(args: argparse.Namespace) -> Result:
    if args.model and not args.all:
        rollouts = [call(args, "GetRollout", pb.GetRolloutRequest(model=args.model)).rollout]
    else:
        response = call(args, "ListRollouts", pb.ListRolloutsRequest(model=args.model or ""))
        rollouts = [r for r in response.rollouts if args.all or r.state in ("running", "paused")]
    doc = {"rollouts": [_document(r) for r in rollouts]}
    none = "no active rollouts (--all: finished ones too)"
    return doc, lambda d: "\n\n".join(_rollout_text(r) for r in d["rollouts"]) or none


def _action(method: str) -> Any:
    def command(args: argparse.Namespace) -> Result:
        response = call(args, method, pb.RolloutActionRequest(model=args.model, reason=args.reason))
        return _document(response.rollout), _rollout_text

    return command


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `rollout` and its subcommands under the `canary-gateway` command."""
    common, change = parent_parsers()
    rollout = commands.add_parser("rollout", help="progressive delivery: step a candidate version up, or roll it back")
    group = rollout.add_subparsers(dest="rollout_command", required=True)

    start = group.add_parser("start", parents=[change], help="start rolling a candidate out over the current version")
    start.set_defaults(func=run, admin_command=_start)
    start.add_argument("model")
    start.add_argument("--candidate", required=True, help="the version to roll out")
    start.add_argument("--steps", type=parse_steps, default=parse_steps("1,5,25,50,100"), help="default 1,5,25,50,100")
    start.add_argument("--interval", type=parse_duration, default=60.0, help="per step: 60s, 5m... (default 60s)")
    shadow = start.add_mutually_exclusive_group()
    shadow.add_argument("--shadow-for", type=parse_duration, help="shadow the candidate this long before any step")
    shadow.add_argument("--shadow-requests", type=count, help="...or for this many shadowed requests")
    start.add_argument(
        "--step-shadow",
        type=lambda text: parse_percent("step-shadow", text),
        help="percent of traffic the candidate also shadows during steps (default 100; 0: no agreement gate)",
    )
    start.add_argument("--max-extensions", type=count, help="extend a step without enough data this often (2)")
    start.add_argument("--min-requests", dest="min_requests", type=count, help="per side before deciding (200)")
    start.add_argument("--max-error-rate-delta", type=float, help="absolute, e.g. 0.01 = 1 pp (default 0.01)")
    start.add_argument("--max-p99-ratio", type=float, help="candidate p99 / baseline p99 (default 1.5)")
    start.add_argument("--p99-slack-ms", type=float, help="p99s closer than this pass (default 1)")
    start.add_argument("--max-ood-rate-delta", type=float, help="absolute (default 0.05)")
    start.add_argument("--min-agreement", type=float, help="shadow vs primary, 0..1 (default 0.95)")
    start.add_argument("--confidence", type=float, help="of the end-of-step tests (default 0.95)")
    outcome = start.add_argument_group("outcome gates", "judged on ground truth sent with `canary-gateway feedback`")
    outcome.add_argument("--min-labelled", type=count, help="labelled requests per side before deciding (100)")
    outcome.add_argument(
        "--accuracy-not-worse-by", type=float, help="classifiers: accuracy the candidate may lose, e.g. 0.02 = 2 pp"
    )
    outcome.add_argument("--mae-not-worse-by", type=float, help="regressors: MAE the candidate may add (target units)")
    outcome.add_argument(
        "--max-equal-opportunity-gap-increase",
        type=float,
        help="how much wider the TPR gap between the groups of --fairness-attribute may get, e.g. 0.05",
    )
    outcome.add_argument("--fairness-attribute", help="a segment attribute the model declares, e.g. region")

    status = group.add_parser("status", parents=[common], help="plan, current step, each gate's figures and verdict")
    status.set_defaults(func=run, admin_command=_status)
    status.add_argument("model", nargs="?")
    status.add_argument("--all", action="store_true", help="finished rollouts too")

    for name, method, summary in (
        ("pause", "PauseRollout", "stop stepping; traffic stays as it is"),
        ("resume", "ResumeRollout", "continue a paused rollout at its step, with a fresh window"),
        ("abort", "AbortRollout", "restore the baseline route and end the rollout"),
        ("promote", "PromoteRollout", "give the candidate all traffic now, whatever the gates say"),
    ):
        action = group.add_parser(name, parents=[change], help=summary)
        action.set_defaults(func=run, admin_command=_action(method))
        action.add_argument("model")
