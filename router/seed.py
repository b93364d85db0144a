"""The route table from the deployment's configuration: `server.routes_file`, applied once at startup.

Replicas behind a load balancer each keep their own route store (`<state_dir>/routes`). Handing them
all the same file gives them the same table, and since a routing key hashes to the same bucket in
every process, a sticky key gets the same version from whichever replica answers.

The file is the whole table. At startup, after the model versions are warmed up and before the
gateway reports ready, every model whose stored route differs from the file's is given the file's
route, and a model the file does not name loses its route (it serves its highest version). Each such
change goes through the same validated, change-logged path as an operator's edit (who `config`, why
`routes_file <path>`, action `config`), so `routes history` shows it and `routes rollback` undoes it.
A stored table that already matches writes nothing: restarts add no entries. Every route is checked
against the ready versions before the first one is written, so a file that cannot be applied (a
version that failed to load, a split that does not sum to 100%) changes nothing and stops the
gateway with a ConfigError naming the file and the model.

Format (TOML; each route in the shape of `Route.to_dict`, weights in basis points, versions as strings):

    [routes.credit]
    split = [["1", 9000], ["2", 1000]]
    sticky_key = "x-user-id"                # or "param:NAME"; leave out for random assignment
    shadows = [["3", 5000]]                 # optional
    allow_pinning = true                    # optional
    override_roles = ["operator", "admin"]  # optional

An empty `[routes]` table means "no routes".
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

from gateway.errors import ConfigError, GatewayError
from router import rules
from router.control import RouteControl
from router.rules import Route, format_weights
from router.store import ChangeEntry

log = logging.getLogger(__name__)

WHO = "config"
"""The identity of changes made from the routes file, in the change log."""


def load_routes_file(path: str | Path) -> dict[str, Route]:
    """Model → route from the file at `path`; ConfigError naming the file (and the model) otherwise."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"server.routes_file: {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # tomllib: not UTF-8 is UnicodeDecodeError
        raise ConfigError(f"server.routes_file {path}: {e}") from None
    unknown = sorted(set(data) - {"routes"})
    if unknown:
        raise ConfigError(f"server.routes_file {path}: unknown key {unknown[0]!r}; routes go in [routes.MODEL] tables")
    table = data.get("routes")
    if not isinstance(table, dict):
        raise ConfigError(f"server.routes_file {path}: no [routes] table (an empty [routes] table means no routes)")
    routes = {}
    for model, fields in table.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"server.routes_file {path}: routes.{model}: expected a table, got {fields!r}")
        try:
            routes[model] = Route.from_dict(fields)
        except GatewayError as e:
            raise _route_error(path, model, e) from None
    return routes


def _route_error(path: str | Path, model: str, error: GatewayError) -> ConfigError:
    return ConfigError(f"server.routes_file {path}: routes.{model}: {error.message}")


def apply_routes_file(
    control: RouteControl,
    path: str | Path,
    ready: Mapping[str, AbstractSet[str]],
    rolling: AbstractSet[str] = frozenset(),
) -> list[ChangeEntry]:
    """Make the stored route table equal to the file's; return the change-log entries written.

    `ready` maps each model to the versions a route may name (what the route control checks too).
    Models in `rolling` have a rollout under way, which owns their route: the file leaves them alone.
    """
    routes = load_routes_file(path)
    for model in sorted(rolling & (set(routes) | set(control.table.routes))):
        log.info("routes_file %s: model %s has a rollout under way; its route is left to the rollout", path, model)
    routes = {model: route for model, route in routes.items() if model not in rolling}
    for model, route in sorted(routes.items()):
        try:
            rules.validate(model, route, ready)
        except GatewayError as e:
            raise _route_error(path, model, e) from None
    control.refresh()  # another process (a worker) may have applied the file already
    stored = control.table.routes
    entries = []
    for model in sorted((set(routes) | set(stored)) - rolling):
        wanted = routes.get(model)
        if stored.get(model) == wanted:
            continue
        try:
            entry = control.change(model, wanted, who=WHO, why=f"routes_file {path}", action="config")
        except GatewayError as e:  # checked above; the store checks again under its lock
            raise _route_error(path, model, e) from None
        if entry.before != entry.after:  # equal: a concurrent applier wrote it first
            entries.append(entry)
    for entry in entries:
        after = "no route" if entry.after is None else f"split {format_weights(entry.after.split)}"
        log.info("routes_file %s: model %s now has %s (change %d)", path, entry.model, after, entry.seq)
    if not entries:
        log.info("routes_file %s: the stored route table already matches", path)
    return entries
