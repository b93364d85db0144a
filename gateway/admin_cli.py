"""`canary-gateway routes | tokens | whoami | status | drift | models`: operate a running gateway through its admin
API.

Every command is one call to `canary.admin.v1.AdminService` (protos/admin.proto) at `--address`,
authenticated with a bearer token taken from `--token`, else `$CANARY_GATEWAY_TOKEN`, else the
admin token the gateway wrote to `<state-dir>/admin.token` on its first start. A command's result
becomes one JSON-able document; `--json` prints it as is, otherwise it is rendered as an aligned
table. Failures exit with a code a script can act on (see `EXIT_*`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from gateway.auth import ADMIN_TOKEN_FILE, ROLES
from gateway.config import ServerConfig
from gateway.errors import InvalidArgument
from gateway.protocol import Stub
from gateway.protocol import admin as pb
from gateway.requestlog.commands import parse_time
from router.rules import DEFAULT_OVERRIDE_ROLES, Weights, format_percent, parse_weights

TOKEN_ENV = "CANARY_GATEWAY_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:8001"

EXIT_FAILED = 1  # any other error
EXIT_USAGE = 2  # argparse's own code for a malformed command line
EXIT_AUTH = 3  # no token, or the gateway refused it (UNAUTHENTICATED, PERMISSION_DENIED)
EXIT_REFUSED = 4  # the gateway refused the change or the lookup; nothing was changed
EXIT_UNAVAILABLE = 5  # no gateway answered

_EXIT_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.NOT_FOUND: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}

Document = dict[str, Any]
"""What a command produced: printed as JSON with --json, rendered as text otherwise."""


class CommandError(Exception):
    """A failure to report on stderr (after "canary-gateway: ") and exit with `exit_code`."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, said on auth errors: "--token", "$CANARY_GATEWAY_TOKEN" or the file


def find_token(args: argparse.Namespace) -> Token:
    """The token from --token, else $CANARY_GATEWAY_TOKEN, else `<state-dir>/admin.token`."""
    if args.token:
        return Token(args.token, "--token")
    if os.environ.get(TOKEN_ENV):
        return Token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    path = Path(args.state_dir) / ADMIN_TOKEN_FILE
    try:
        return Token(path.read_text().strip(), str(path))
    except FileNotFoundError:
        raise CommandError(
            EXIT_AUTH,
            f"no token: pass --token, set {TOKEN_ENV}, or point --state-dir at the gateway's state directory "
            f"({path} does not exist)",
        ) from None
    except OSError as e:
        raise CommandError(EXIT_AUTH, f"cannot read the token file {path}: {e.strerror}") from None


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CommandError(EXIT_FAILED, f"{flag} {path}: {e.strerror}") from None


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS when --tls-ca is given (with --tls-cert/--tls-key: mTLS)."""
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise CommandError(
                EXIT_USAGE, "--tls-cert and --tls-key need --tls-ca (the CA that signed the gateway's certificate)"
            )
        return grpc.insecure_channel(args.address)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CommandError(EXIT_USAGE, "--tls-cert and --tls-key go together (a client certificate and its key)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        private_key=_read(args.tls_key, "--tls-key"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
    )
    return grpc.secure_channel(args.address, credentials)


def call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One admin RPC with the caller's token; a gRPC error becomes a CommandError with its exit code."""
    token = find_token(args)
    with open_channel(args) as channel:
        rpc = getattr(Stub(channel, pb.AdminService), method)
        try:
            return rpc(request, metadata=[("authorization", f"Bearer {token.value}")], timeout=args.timeout)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "Connection refused" in details:
        details = f"cannot reach a gateway at {args.address}: connection refused (is it running? see --address)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach a gateway at {args.address}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"no answer from {args.address} within {args.timeout:g}s (--timeout)"
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        details = f"{args.address} does not serve {pb.AdminService.full_name}: {details}"
    elif _EXIT_CODES.get(code) == EXIT_AUTH:
        details = f"{details} (token from {token.source})"
    raise CommandError(_EXIT_CODES.get(code, EXIT_FAILED), f"{code.name}: {details}")


# --- documents: admin messages as plain data ----------------------------------------------------


def _weights(pairs: Iterable[tuple[str, int]]) -> list[Document]:
    return [{"version": v, "bps": bps, "percent": bps / 100} for v, bps in pairs]


def _route(message: Any) -> Document:
    return {
        "model": message.model,
        "explicit": message.explicit,
        "split": _weights((s.version, s.bps) for s in message.split),
        "sticky_key": message.sticky_key or None,
        "shadows": _weights((s.version, s.bps) for s in message.shadows),
        "allow_pinning": message.allow_pinning,
        "override_roles": list(message.override_roles),
        "ready_versions": list(message.ready_versions),
    }


def _stored_route(text: str) -> Document | None:
    """A change-log entry's before/after (router.rules.Route.to_dict as JSON; "" for no route)."""
    if not text:
        return None
    data = json.loads(text)
    return {
        "split": _weights(map(tuple, data["split"])),
        "sticky_key": data["sticky_key"],
        "shadows": _weights(map(tuple, data["shadows"])),
        "allow_pinning": data["allow_pinning"],
        "override_roles": data["override_roles"],
    }


def _entry(message: Any) -> Document:
    return {
        "seq": message.seq,
        "time_ns": message.time_ns,
        "time": _time(message.time_ns),
        "who": message.who,
        "why": message.why,
        "action": message.action,
        "model": message.model,
        "before": _stored_route(message.before_json),
        "after": _stored_route(message.after_json),
        "details": json.loads(message.details_json) if message.details_json else None,
    }


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- text: every table and summary is rendered here ---------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned to their widest cell, two spaces apart."""
    cells = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _shares(weights: Sequence[Mapping[str, Any]] | None) -> str:
    if weights is None:
        return "highest version"
    return " ".join(f"{w['version']}={format_percent(w['bps'])}%" for w in weights) or "-"


def _pinning(allowed: bool) -> str:
    return "allowed" if allowed else "forbidden"


_FIELDS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("split", "split", _shares),
    ("sticky_key", "sticky", lambda key: key or "-"),
    ("shadows", "shadows", _shares),
    ("allow_pinning", "pinning", _pinning),
    ("override_roles", "override roles", lambda roles: ",".join(roles) or "-"),
)
_NO_ROUTE: Document = {
    "split": None,  # the highest ready version takes all traffic
    "sticky_key": None,
    "shadows": [],
    "allow_pinning": True,
    "override_roles": [role for role in ROLES if role in DEFAULT_OVERRIDE_ROLES],
}


def _difference(before: Document | None, after: Document | None) -> str:
    """What a change did, field by field: "split 2=100% → 1=90% 2=10%" (no route: the highest version's)."""
    old, new = before or _NO_ROUTE, after or _NO_ROUTE
    changed = [f"{label} {show(old[key])} → {show(new[key])}" for key, label, show in _FIELDS if old[key] != new[key]]
    return "; ".join(changed) or "no difference"


def _change_summary(entry: Document) -> str:
    """A route change's difference, or what a model action did ("version 3, sha256 ab12…")."""
    details = entry["details"]
    if details is None:
        return _difference(entry["before"], entry["after"])
    text = f"version {details['version']}, sha256 {details['sha256'][:12]}"
    if "replaced_sha256" in details:
        text += f" (replaced {details['replaced_sha256'][:12]})"
    return text


def _routes_text(doc: Document) -> str:
    rows = [
        (
            r["model"],
            "set" if r["explicit"] else "default",
            _shares(r["split"]),
            r["sticky_key"] or "-",
            _shares(r["shadows"]),
            _pinning(r["allow_pinning"]),
            " ".join(r["ready_versions"]) or "-",
        )
        for r in doc["routes"]
    ]
    return table(("MODEL", "ROUTE", "SPLIT", "STICKY KEY", "SHADOWS", "PINNING", "READY"), rows)


def _change_text(doc: Document) -> str:
    e = doc["entry"]
    route = _routes_text({"routes": [doc["route"]]})
    if not e["seq"]:  # the route was already so: nothing was logged, there is no change number
        return f"{e['model']}: route already in place; {e['action']} changed nothing and was not logged\n\n{route}"
    return (
        f"{e['model']}: {e['action']} applied (change {e['seq']} by {e['who']}: {e['why']})\n"
        f"  {_difference(e['before'], e['after'])}\n\n{route}"
    )


def _history_text(doc: Document) -> str:
    if not doc["entries"]:
        return "no route changes"
    rows = [
        (e["seq"], e["time"], e["who"], e["action"], e["model"], e["why"], _change_summary(e)) for e in doc["entries"]
    ]
    return table(("SEQ", "TIME (UTC)", "WHO", "ACTION", "MODEL", "REASON", "CHANGE"), rows)


def _agreement_text(doc: Document) -> str:
    if not doc["stats"]:
        return "no shadow comparisons yet"
    rows = [
        (
            s["model"],
            s["primary_version"],
            s["shadow_version"],
            s["compared"],
            s["agreed"],
            f"{format_percent(round(s['rate'] * 10000))}%",
            s["shed"],
            s["failed"],
        )
        for s in doc["stats"]
    ]
    return table(("MODEL", "PRIMARY", "SHADOW", "COMPARED", "AGREED", "RATE", "SHED", "FAILED"), rows)


def _tokens_text(doc: Document) -> str:
    return table(("NAME", "ROLE", "CREATED (UTC)"), ((t["name"], t["role"], t["created"]) for t in doc["tokens"]))


# --- commands: each returns its document and how to render it -----------------------------------

Result = tuple[Document, Callable[[Document], str]]
Command = Callable[[argparse.Namespace], Result]


def _show(args: argparse.Namespace) -> Result:
    response = call(args, "GetRoutes", pb.GetRoutesRequest(model=args.model or ""))
    return {"table_version": response.table_version, "routes": [_route(r) for r in response.routes]}, _routes_text


def _change(args: argparse.Namespace, method: str, request: Any) -> Result:
    response = call(args, method, request)
    doc = {"entry": _entry(response.entry), "route": _route(response.route), "table_version": response.table_version}
    return doc, _change_text


def _shares_request(groups: Sequence[Weights]) -> list[Any]:
    """The VERSION=PERCENT arguments (each parsed into one group) as VersionShare messages."""
    return [pb.VersionShare(version=v, bps=bps) for group in groups for v, bps in group]


def _split(args: argparse.Namespace) -> Result:
    request = pb.SetSplitRequest(model=args.model, split=_shares_request(args.weights), reason=args.reason)
    return _change(args, "SetSplit", request)


def _sticky(args: argparse.Namespace) -> Result:
    request = pb.SetStickyRequest(model=args.model, sticky_key=args.key, reason=args.reason)
    return _change(args, "SetSticky", request)


def _shadow(args: argparse.Namespace) -> Result:
    request = pb.SetShadowsRequest(model=args.model, shadows=_shares_request(args.weights), reason=args.reason)
    return _change(args, "SetShadows", request)


def _pin(args: argparse.Namespace) -> Result:
    request = pb.SetPinPolicyRequest(model=args.model, allow_pinning=args.allow, reason=args.reason)
    return _change(args, "SetPinPolicy", request)


def _override(args: argparse.Namespace) -> Result:
    request = pb.SetOverrideRolesRequest(model=args.model, roles=args.roles, reason=args.reason)
    return _change(args, "SetOverrideRoles", request)


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    return roles


def _promote(args: argparse.Namespace) -> Result:
    return _change(args, "Promote", pb.PromoteRequest(model=args.model, version=args.version, reason=args.reason))


def _rollback(args: argparse.Namespace) -> Result:
    return _change(args, "Rollback", pb.RollbackRequest(model=args.model, reason=args.reason))


def _history(args: argparse.Namespace) -> Result:
    request = pb.HistoryRequest(
        model=args.model or "", since_ns=args.since or 0, until_ns=args.until or 0, limit=args.limit
    )
    return {"entries": [_entry(e) for e in call(args, "History", request).entries]}, _history_text


def _agreement(args: argparse.Namespace) -> Result:
    response = call(args, "Agreement", pb.AgreementRequest(model=args.model or ""))
    fields = ("model", "primary_version", "shadow_version", "compared", "agreed", "rate", "shed", "failed")
    return {"stats": [{f: getattr(s, f) for f in fields} for s in response.stats]}, _agreement_text


def _create_token(args: argparse.Namespace) -> Result:
    response = call(args, "CreateToken", pb.CreateTokenRequest(role=args.role, name=args.name))
    if not args.json:  # stdout carries the token alone, for `TOKEN=$(canary-gateway tokens create ...)`
        print(f"created token {args.name!r} with role {args.role!r}; it is shown only once:", file=sys.stderr)
    return {"name": args.name, "role": args.role, "token": response.token}, lambda doc: str(doc["token"])


def _revoke_token(args: argparse.Namespace) -> Result:
    call(args, "RevokeToken", pb.RevokeTokenRequest(name=args.name))
    return {"revoked": args.name}, lambda doc: f"revoked token {doc['revoked']!r}"


def _list_tokens(args: argparse.Namespace) -> Result:
    tokens = call(args, "ListTokens", pb.ListTokensRequest()).tokens
    return {
        "tokens": [
            {"name": t.name, "role": t.role, "created_ns": t.created_ns, "created": _time(t.created_ns)} for t in tokens
        ]
    }, _tokens_text


def _status(args: argparse.Namespace) -> Result:
    response = call(args, "GetStatus", pb.GetStatusRequest(model=args.model or "", window_s=args.window))
    traffic_fields = (
        "version",
        "role",
        "requests",
        "rate_per_s",
        "error_rate",
        "p50_ms",
        "p99_ms",
        "ood_rate",
        "scored",
    )
    version_fields = ("version", "state", "reason", "has_profile", "drift_alert")
    models = [
        {
            "model": m.model,
            "route": _route(m.route),
            "ood_policy": m.ood_policy,
            "versions": [
                {**{f: getattr(v, f) for f in version_fields}, "drifting_features": list(v.drifting_features)}
                for v in m.versions
            ],
            "traffic": [{f: getattr(t, f) for f in traffic_fields} for t in m.traffic],
            "refused": dict(sorted(m.refused.items())),
        }
        for m in response.models
    ]
    worker_fields = ("slot", "pid", "started_ns", "updated_ns", "restarts", "requests")
    workers = [{f: getattr(w, f) for f in worker_fields} for w in response.workers]
    return {"window_s": response.window_s, "models": models, "workers": workers}, _status_text


def _status_text(doc: Document) -> str:
    blocks = []
    for m in doc["models"]:
        route = m["route"]
        head = (
            f"{m['model']}: split {_shares(route['split'] if route['explicit'] else None)}, "
            f"sticky {route['sticky_key'] or '-'}, shadows {_shares(route['shadows'])}, ood policy {m['ood_policy']}"
        )
        traffic: dict[str, list[Document]] = {}
        for t in m["traffic"]:
            traffic.setdefault(t["version"], []).append(t)
        rows = []
        for v in m["versions"]:
            drift = ("ALERT " + ",".join(v["drifting_features"][:4])) if v["drift_alert"] else "-"
            profile = "yes" if v["has_profile"] else "none"
            state = v["state"] if not v["reason"] else f"{v['state']} ({v['reason'][:40]})"
            seen: list[Document | None] = list(traffic.get(v["version"], [])) or [None]
            for t in seen:
                figures: tuple[object, ...] = ("-",) * 6
                if t is not None:
                    ood = f"{t['ood_rate']:.1%}" if t["scored"] else "-"
                    figures = (
                        f"{t['rate_per_s']:.1f}",
                        f"{t['error_rate']:.1%}",
                        f"{t['p50_ms']:.2f}",
                        f"{t['p99_ms']:.2f}",
                        ood,
                        t["requests"],
                    )
                rows.append((v["version"], state, t["role"] if t else "-", *figures, profile, drift))
        headers = ("VERSION", "STATE", "ROLE", "REQ/S", "ERRORS", "P50 MS", "P99 MS", "OOD", "REQUESTS", "PROFILE")
        refused = ", ".join(f"{limit} {count}" for limit, count in m["refused"].items())
        tail = f"\nrefused by limits since start: {refused}" if refused else ""
        blocks.append(head + "\n" + table((*headers, "DRIFT"), rows) + tail)
    if doc["workers"]:
        now_ns = time.time_ns()
        rows = [
            (
                w["slot"],
                w["pid"],
                f"{(now_ns - w['started_ns']) / 1e9:.0f} s",
                f"{max(0, now_ns - w['updated_ns']) / 1e9:.1f} s ago",
                w["restarts"],
                w["requests"],
            )
            for w in doc["workers"]
        ]
        worker_headers = ("WORKER", "PID", "UP", "FIGURES", "RESTARTS", "REQUESTS")
        blocks.append(f"{len(rows)} workers (figures above summed over them)\n" + table(worker_headers, rows))
    return f"last {doc['window_s']:g} s of traffic\n\n" + "\n\n".join(blocks)


def _drift(args: argparse.Namespace) -> Result:
    response = call(args, "GetDrift", pb.GetDriftRequest(model=args.model))
    versions = []
    for v in response.versions:
        version: Document = {"version": v.version, "has_profile": v.has_profile}
        if v.has_profile:
            scalars = ("window_rows", "observed_rows", "ood_rate", "alert", "psi_threshold", "ks_threshold", "min_rows")
            version.update({f: getattr(v, f) for f in scalars})
            version["features"] = [
                {
                    "name": f.name,
                    "psi": f.psi,
                    "ks": f.ks,
                    "drifting": f.drifting,
                    "bin_edges": list(f.bin_edges),
                    "training_fractions": list(f.training_fractions),
                    "live_fractions": list(f.live_fractions),
                }
                for f in v.features
            ]
        versions.append(version)
    doc = {"model": response.model, "versions": versions}
    if args.plot:
        doc["plots"] = [str(path) for path in _plot_drift(doc, args.plot)]
    return doc, lambda d: _drift_text(d, args.all)


def _plot_drift(doc: Document, path: str) -> list[Path]:
    """One PNG per profiled version: FILE.png for one version, FILE-v<version>.png for several."""
    from gateway.ood.drift import FeatureHistogram, plot_histograms

    profiled = [v for v in doc["versions"] if v["has_profile"]]
    written = []
    for v in profiled:
        target = Path(path) if len(profiled) == 1 else Path(path).with_name(f"{Path(path).stem}-v{v['version']}.png")
        ranked = sorted(v["features"], key=lambda f: -f["psi"])
        chosen = [f for f in ranked if f["drifting"]][:8] or ranked[:1]
        histograms = [
            FeatureHistogram(f["name"], f["bin_edges"], f["training_fractions"], f["live_fractions"], f["psi"], f["ks"])
            for f in chosen
        ]
        title = (
            f"{doc['model']} v{v['version']}: {v['window_rows']} recent rows vs training; "
            f"OOD rate {v['ood_rate']:.1%}; {'ALERT' if v['alert'] else 'no alert'}"
        )
        written.append(plot_histograms(histograms, title, target))
    return written


def _drift_text(doc: Document, show_all: bool) -> str:
    blocks = []
    for v in doc["versions"]:
        if not v["has_profile"]:
            blocks.append(f"{doc['model']} version {v['version']}: no OOD profile (served unscored)")
            continue
        verdict = "" if v["window_rows"] >= v["min_rows"] else f"; no verdict below {v['min_rows']} rows"
        head = (
            f"{doc['model']} version {v['version']}: {v['window_rows']} rows in the window "
            f"({v['observed_rows']} observed), OOD rate {v['ood_rate']:.1%}, "
            f"drift alert {'ON' if v['alert'] else 'off'} (PSI > {v['psi_threshold']:g} or KS > {v['ks_threshold']:g}"
            f"{verdict})"
        )
        ranked = sorted(v["features"], key=lambda f: -f["psi"])
        shown = ranked if show_all else ranked[:10]
        rows = [(f["name"], f"{f['psi']:.3f}", f"{f['ks']:.3f}", "DRIFTING" if f["drifting"] else "") for f in shown]
        more = "" if len(shown) == len(ranked) else f"\n({len(ranked) - len(shown)} more features: --all)"
        blocks.append(head + "\n" + table(("FEATURE", "PSI", "KS", ""), rows) + more)
    plots = "".join(f"\nplot written to {p}" for p in doc.get("plots", []))
    return "\n\n".join(blocks) + plots


_VERSION_FIELDS = ("model", "version", "state", "reason", "sha256", "in_use", "has_profile")


def _version_doc(message: Any) -> Document:
    return {**{f: getattr(message, f) for f in _VERSION_FIELDS}, "provenance": dict(message.provenance)}


def _models_text(doc: Document) -> str:
    rows = [
        (
            v["model"],
            v["version"],
            v["state"] if not v["reason"] else f"{v['state']}: {v['reason'][:60]}",
            v["sha256"][:12] or "-",
            "yes" if v["has_profile"] else "-",
            v["in_use"] or "-",
            ", ".join(f"{k}={val}" for k, val in sorted(v["provenance"].items()))[:60] or "-",
        )
        for v in doc["versions"]
    ]
    return table(("MODEL", "VERSION", "STATE", "SHA256", "PROFILE", "ROUTED", "PROVENANCE"), rows)


def _list_models(args: argparse.Namespace) -> Result:
    response = call(args, "ListModels", pb.ListModelsRequest(model=args.model or ""))
    return {"versions": [_version_doc(v) for v in response.versions]}, _models_text


def _model_change_text(doc: Document) -> str:
    e, v = doc["entry"], doc["version"]
    return f"{e['model']}: {e['action']} {_change_summary(e)} (change {e['seq']} by {e['who']}: {e['why']})\n" + (
        _models_text({"versions": [v]})
    )


def _load_model(args: argparse.Namespace) -> Result:
    request = pb.LoadModelRequest(
        model=args.model,
        version=args.version,
        reason=args.reason,
        replace=args.replace,
        force_signature=args.force_signature,
    )
    response = call(args, "LoadModel", request)
    return {"entry": _entry(response.entry), "version": _version_doc(response.version)}, _model_change_text


def _unload_model(args: argparse.Namespace) -> Result:
    request = pb.UnloadModelRequest(model=args.model, version=args.version, reason=args.reason)
    response = call(args, "UnloadModel", request)
    return {"entry": _entry(response.entry), "version": _version_doc(response.version)}, _model_change_text


def _whoami(args: argparse.Namespace) -> Result:
    response = call(args, "WhoAmI", pb.WhoAmIRequest())
    doc = {
        "name": response.name,
        "role": response.role,
        "address": args.address,
        "token_source": find_token(args).source,
    }
    return doc, lambda d: f"{d['name']} ({d['role']}) at {d['address']}, token from {d['token_source']}"


def run(args: argparse.Namespace) -> int:
    """Run the chosen admin command; print its result (or the error) and return the exit code."""
    try:
        doc, render = args.admin_command(args)
    except CommandError as e:
        print(f"canary-gateway: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


# --- command line -------------------------------------------------------------------------------


def _weight_arg(text: str) -> Weights:
    try:
        return parse_weights("weights", text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(e.message) from None


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more (isdecimal, not isdigit: int() refuses "²")."""
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def parent_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options every admin command takes, and those plus `--reason` for commands that change traffic."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"the gateway's HOST:PORT (default {DEFAULT_ADDRESS})"
    )
    common.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV}, else <state-dir>/{ADMIN_TOKEN_FILE})")
    common.add_argument(
        "--state-dir",
        default=ServerConfig.state_dir,
        help="where to find the gateway's admin.token (default %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway (default 10)")
    common.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (the gateway's [tls])")
    common.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (with --tls-key)")
    common.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    change = argparse.ArgumentParser(add_help=False, parents=[common])
    change.add_argument("--reason", required=True, help="why you make this change (kept in the change log)")
    return common, change


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register `routes`, `tokens`, `whoami`, `status`, `drift` and `models` under the `canary-gateway` command."""
    common, change = parent_parsers()

    def leaf(
        group: argparse._SubParsersAction, name: str, handler: Command, summary: str, changes: bool = False
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, help=summary, parents=[change if changes else common])
        parser.set_defaults(func=run, admin_command=handler)
        return parser

    routes = commands.add_parser("routes", help="show and change how traffic is routed to model versions")
    group = routes.add_subparsers(dest="routes_command", required=True)
    leaf(group, "show", _show, "every model's route (or one model's)").add_argument("model", nargs="?")
    split = leaf(group, "split", _split, "set the weighted split: split credit 1=90 2=10", changes=True)
    split.add_argument("model")
    split.add_argument("weights", nargs="+", type=_weight_arg, metavar="VERSION=PERCENT")
    sticky = leaf(group, "sticky", _sticky, "route by a key: metadata key or param:NAME", changes=True)
    sticky.add_argument("model")
    which = sticky.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help='metadata key such as x-user-id, or param:NAME; "" removes it')
    which.add_argument("--none", dest="key", action="store_const", const="", help="remove the sticky key")
    shadow = leaf(group, "shadow", _shadow, "mirror traffic to versions: shadow credit 3=50 (none: stop)", changes=True)
    shadow.add_argument("model")
    shadow.add_argument("weights", nargs="*", type=_weight_arg, metavar="VERSION=PERCENT")
    pin = leaf(group, "pin", _pin, "may clients ask for an explicit model_version?", changes=True)
    pin.add_argument("model")
    allow = pin.add_mutually_exclusive_group(required=True)
    allow.add_argument(
        "--allow", dest="allow", action="store_true", default=None, help="clients may name a model_version"
    )
    allow.add_argument("--forbid", dest="allow", action="store_false", help="refuse requests that name a model_version")
    override = leaf(group, "override", _override, "which roles may send x-route-version", changes=True)
    override.add_argument("model")
    who = override.add_mutually_exclusive_group(required=True)
    who.add_argument("--roles", type=_roles, help="comma-separated roles, e.g. operator,admin")
    who.add_argument("--none", dest="roles", action="store_const", const=[], help="no one may override")
    promote = leaf(group, "promote", _promote, "one version takes all traffic", changes=True)
    promote.add_argument("model")
    promote.add_argument("version")
    leaf(group, "rollback", _rollback, "return to the route before the last change", changes=True).add_argument("model")
    history = leaf(group, "history", _history, "the change log: who changed what, when and why")
    history.add_argument("model", nargs="?")
    history.add_argument("--since", type=parse_time, help="10m, 2h, 1d, ISO-8601 or ns")
    history.add_argument("--until", type=parse_time)
    history.add_argument("--limit", type=count, default=0, help="only the newest N changes (0: all)")
    leaf(group, "agreement", _agreement, "how often shadows agree with the primary").add_argument("model", nargs="?")

    tokens = commands.add_parser("tokens", help="create, revoke and list API tokens (admin role)")
    group = tokens.add_subparsers(dest="tokens_command", required=True)
    create = leaf(group, "create", _create_token, "a new token, printed once")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True, help="who or what uses it, e.g. ci-deployer")
    leaf(group, "revoke", _revoke_token, "refuse a token from now on").add_argument("name")
    leaf(group, "list", _list_tokens, "names, roles and creation times (never the tokens)")

    leaf(commands, "whoami", _whoami, "the name and role of the token this command uses")
    models = commands.add_parser("models", help="list, load and unload model versions while the gateway serves")
    group = models.add_subparsers(dest="models_command", required=True)
    leaf(group, "list", _list_models, "every version: state, sha256, profile, whether a route uses it").add_argument(
        "model", nargs="?"
    )
    load = leaf(group, "load", _load_model, "load, warm up and publish <repository>/MODEL/VERSION", changes=True)
    load.add_argument("model")
    load.add_argument("version")
    load.add_argument("--replace", action="store_true", help="swap in a changed file for a loaded version")
    load.add_argument(
        "--force-signature", action="store_true", help="accept inputs/outputs that differ from the other versions'"
    )
    unload = leaf(
        group, "unload", _unload_model, "stop routing to a version, finish its requests, free it", changes=True
    )
    unload.add_argument("model")
    unload.add_argument("version")
    status = leaf(commands, "status", _status, "per model: route, and per version rate, errors, latency, OOD, drift")
    status.add_argument("model", nargs="?")
    status.add_argument("--window", type=float, default=60.0, help="seconds of recent traffic (default 60)")
    drift = leaf(commands, "drift", _drift, "how far each version's recent inputs are from its training data")
    drift.add_argument("model")
    drift.add_argument("--plot", metavar="FILE.png", help="draw the drifting features' histograms (needs matplotlib)")
    drift.add_argument("--all", action="store_true", help="list every feature, not the 10 with the largest PSI")
