"""`canary-gateway feedback FILE` and `canary-gateway quality MODEL`: send ground truth, read quality.

`feedback` reads JSON Lines or CSV (`request_id`, then `label` or `value`, optional `observed_ns`
and `weight`), checks each line's types locally (a bad line is reported with its line number and
field, and not sent), and sends the rest in batches through `SubmitFeedback`. `quality` renders
`GetQuality`: versions side by side, then per-group rates, optionally plotted.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from gateway.admin_cli import Document, Result, call, parent_parsers, run, table
from gateway.protocol import admin as pb
from gateway.requestlog.commands import parse_time

DEFAULT_BATCH = 5000
EXTRA_CELLS = "<cells beyond the header>"
_INTEGER = re.compile(r"-?[0-9]+")


def _entry(where: str, row: dict[str, Any]) -> Any:
    """A Feedback message from one parsed line; ValueError naming the line and field when malformed."""
    unknown = sorted(map(str, set(row) - {"request_id", "label", "value", "observed_ns", "weight"}))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (request_id, label | value, observed_ns, weight)")
    request_id = row.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"{where}: request_id: {request_id!r} is not a non-empty string")
    entry = pb.Feedback(request_id=request_id)
    label, value = row.get("label"), row.get("value")
    if (label is None) == (value is None):
        raise ValueError(f"{where}: set exactly one of label (classifiers) and value (regressors)")
    if label is not None:
        if isinstance(label, str) and _INTEGER.fullmatch(label):  # CSV cells are text
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not -(2**63) <= label < 2**63:
            raise ValueError(f"{where}: label: {label!r} is not an integer class (a 64-bit integer)")
        entry.label = label
    else:
        number = _number(where, "value", value)
        if not math.isfinite(number):
            raise ValueError(f"{where}: value: {value!r} is not a finite number")
        entry.value = number
    if row.get("observed_ns") not in (None, ""):
        observed = row["observed_ns"]
        if isinstance(observed, str) and observed.isdecimal():
            observed = int(observed)
        if not isinstance(observed, int) or isinstance(observed, bool) or observed < 0:
            raise ValueError(f"{where}: observed_ns: {observed!r} is not a time in ns since the epoch")
        entry.observed_ns = observed
    if row.get("weight") not in (None, ""):
        entry.weight = _number(where, "weight", row["weight"])
    return entry


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name}: {value!r} is not a number") from None


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(where, parsed row) per line, or (where, error text) for a line that is not a record at all."""
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, which would join the first column's name
    with path.open(newline="", encoding="utf-8-sig") as f:
        if path.suffix == ".csv":
            rows = csv.DictReader(f, restkey=EXTRA_CELLS)
            for row in rows:  # line_num, not a count of rows: blank lines are skipped, and a cell may span lines
                yield f"{path}:{rows.line_num}", {k: v for k, v in row.items() if v not in (None, "")}
            return
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", f"{path}:{n}: not JSON: {e.msg}"
                continue
            yield f"{path}:{n}", parsed if isinstance(parsed, dict) else f"{path}:{n}: not a JSON object"


def _feedback(args: argparse.Namespace) -> Result:
    path = Path(args.file)
    if path.suffix not in (".jsonl", ".csv"):
        raise SystemExit(f"canary-gateway: {path}: expected a .jsonl or .csv file")
    doc: Document = {"model": args.model, "sent": 0, "stored": 0, "overwritten": 0, "unknown_ids": [], "invalid": []}
    started = time.perf_counter()
    batch: list[Any] = []
    places: list[str] = []

    def send() -> None:
        response = call(args, "SubmitFeedback", pb.SubmitFeedbackRequest(model=args.model, entries=batch))
        doc["sent"] += len(batch)
        doc["stored"] += response.stored
        doc["overwritten"] += response.overwritten
        doc["unknown_ids"] += list(response.unknown_ids)
        doc["invalid"] += [f"{places[i.index]}: {i.reason}" for i in response.invalid]
        batch.clear()
        places.clear()

    for where, row in _rows(path):
        try:
            if isinstance(row, str):
                raise ValueError(row)
            batch.append(_entry(where, row))
            places.append(where)
        except ValueError as e:
            doc["invalid"].append(str(e))
        if len(batch) >= args.batch:
            send()
    if batch:
        send()
    doc["seconds"] = time.perf_counter() - started
    return doc, _feedback_text


def _feedback_text(doc: Document) -> str:
    lines = [
        f"{doc['model']}: sent {doc['sent']}, stored {doc['stored']} ({doc['overwritten']} overwrote earlier truth), "
        f"unknown ids {len(doc['unknown_ids'])}, invalid {len(doc['invalid'])} in {doc['seconds']:.2f}s"
    ]
    lines += [f"  unknown request id: {i}" for i in doc["unknown_ids"][:20]]
    lines += [f"  invalid: {i}" for i in doc["invalid"][:20]]
    return "\n".join(lines)


METRICS = ("accuracy", "precision", "recall", "fpr", "log_loss", "auroc", "ece", "mae", "rmse")


def _quality(args: argparse.Namespace) -> Result:
    request = pb.GetQualityRequest(model=args.model, since_ns=args.since or 0, until_ns=args.until or 0)
    response = call(args, "GetQuality", request)
    doc = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if args.plot:
        doc["plot"] = str(plot_quality(doc, args.plot))
    return doc, _quality_text


def _f(value: Any) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == "NaN"
        else f"{float(value):.3f}"
    )


def _quality_text(doc: Document) -> str:
    versions = doc["versions"]
    if not versions:
        return f"{doc['model']}: no answered requests in the window"
    shown = [m for m in METRICS if any(m in v["metrics"] for v in versions)]
    rows = [
        (v["version"], v["role"], v["requests"], v["labelled"], *(_f(v["metrics"].get(m)) for m in shown))
        for v in versions
    ]
    blocks = [table(("VERSION", "ROLE", "REQUESTS", "LABELLED", *(m.upper() for m in shown)), rows)]
    for v in versions:
        for f in v["fairness"]:
            group_rows = [
                (
                    g["group"],
                    g["n"],
                    g["positives"],
                    *(
                        ("too small",) * 3
                        if g["too_small"]
                        else (
                            f"{_f(r['value'])} [{_f(r['low'])}, {_f(r['high'])}]"
                            for r in (g["positive_rate"], g["tpr"], g["fpr"])
                        )
                    ),
                )
                for g in f["groups"]
            ]
            head = (
                f"v{v['version']} {v['role']} by {f['attribute']}: "
                f"parity gap {_f(f['demographic_parity_difference'])}, "
                f"equal opportunity gap {_f(f['equal_opportunity_difference'])}, FPR gap {_f(f['fpr_difference'])}"
            )
            alerts = "".join(f"\n  ALERT {a}" for a in f["alerts"])
            blocks.append(
                head + alerts + "\n" + table(("GROUP", "N", "POSITIVES", "POSITIVE RATE", "TPR", "FPR"), group_rows)
            )
    return "\n\n".join(blocks)


def plot_quality(doc: Document, path: str) -> Path:
    """Per-version calibration curves, and per-group TPR with its interval, into one PNG (the `plot` extra)."""
    from matplotlib.figure import Figure  # optional dependency; the object API leaves pyplot's global state alone

    versions = [v for v in doc["versions"] if v["labelled"]]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    calibration, groups = figure.subplots(1, 2)
    calibration.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    for v in versions:
        bins = v["calibration"]
        if bins:
            calibration.plot(
                [b["mean_score"] for b in bins],
                [b["positive_rate"] for b in bins],
                marker="o",
                label=f"v{v['version']} {v['role']} (ECE {_f(v['metrics'].get('ece'))})",
            )
    calibration.set_xlabel("mean predicted probability")
    calibration.set_ylabel("observed positive rate")
    calibration.set_title("calibration")
    calibration.legend(fontsize=8)
    labels: list[str] = []
    for i, v in enumerate(versions):
        legend: str | None = f"v{v['version']} {v['role']}"
        for f in v["fairness"]:
            for g in (g for g in f["groups"] if not g["too_small"]):
                # MessageToDict writes a NaN double as the string "NaN": a group with no true
                # positives has no TPR, shown as "-" in the table and as an empty, marked tick here.
                value, low, high = (float(g["tpr"][k]) for k in ("value", "low", "high"))
                label = f"{f['attribute']}={g['group']}"
                if math.isnan(value):
                    labels.append(f"{label} (no TPR)")
                    continue
                groups.errorbar(
                    [len(labels)], [value], yerr=[[value - low], [high - value]], fmt="o", color=f"C{i}", label=legend
                )
                legend = None  # one legend entry per version
                labels.append(label)
    groups.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    groups.set_ylabel("true-positive rate (95% Wilson)")
    groups.set_title("equal opportunity by group")
    if labels:
        groups.legend(fontsize=8)
    figure.suptitle(f"{doc['model']}: quality on ground truth")
    target = Path(path)
    figure.savefig(target, dpi=100)
    return target


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `feedback` and `quality` under the `canary-gateway` command."""
    common, _ = parent_parsers()
    feedback = commands.add_parser(
        "feedback", parents=[common], help="send ground truth for logged requests (operator)"
    )
    feedback.set_defaults(func=run, admin_command=_feedback)
    feedback.add_argument("file", help="FILE.jsonl or FILE.csv: request_id, label | value, observed_ns, weight")
    feedback.add_argument("--model", required=True, help="the model the requests were for")
    feedback.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help=f"entries per call (default {DEFAULT_BATCH})"
    )
    quality = commands.add_parser(
        "quality", parents=[common], help="per-version quality and per-group fairness (viewer)"
    )
    quality.set_defaults(func=run, admin_command=_quality)
    quality.add_argument("model")
    quality.add_argument(
        "--since", type=parse_time, help="requests since: 10m, 2h, 1d, ISO-8601, ns (default feedback.window_s)"
    )
    quality.add_argument("--until", type=parse_time, help="requests until (default now)")
    quality.add_argument(
        "--plot", metavar="FILE.png", help="calibration curves and per-group TPR (needs the plot extra)"
    )
