"""The live route table: an immutable snapshot of every model's compiled route, and the routing decision.

A `RouteTable` never changes after it is built; a route change builds a new one and the application swaps
it in with one attribute assignment. A request reads that attribute once and asks the same snapshot for
its sticky key and its decision, so it sees the old table or the new one, never a mix.

`decide` does no I/O and, for routed traffic, allocates nothing: each route's possible decisions (which
version serves, which shadows fire) are built once at compile time and the native split returns the
index of the one that applies (router.bucketing explains the outcome numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import Literal, NamedTuple, Protocol

from gateway.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from native.routing import Split
from router.bucketing import outcome_table, salt_for
from router.rules import DEFAULT_OVERRIDE_ROLES, Route, StickyKey

OVERRIDE_HEADER = "x-route-version"
"""The metadata key with which a caller of an allowed role sends a request to a version of its choice."""

Reason = Literal["split", "pinned", "override", "default"]


class Decision(NamedTuple):
    """Which version answers a request, and why; which shadow versions the request is mirrored to.

    A NamedTuple: immutable, so the table shares one instance among all requests with the same outcome,
    and built positionally it costs a third of a frozen dataclass on the paths that do build one.
    """

    version: str
    role: str = "primary"
    shadows: tuple[str, ...] = ()
    reason: Reason = "split"


class Splitter(Protocol):
    """What the table needs of a compiled split: `native.routing.Split` or `router.bucketing.ReferenceSplit`."""

    @property
    def versions(self) -> tuple[str, ...]: ...
    @property
    def shadow_versions(self) -> tuple[str, ...]: ...
    def outcome(self, key: str) -> int: ...
    def outcome_random(self) -> int: ...


SplitType = Callable[[Sequence[tuple[str, int]], int, Sequence[tuple[str, int, int]]], Splitter]
"""Builds a splitter from (split, salt, shadows with their salts)."""


class _Compiled:
    __slots__ = ("route", "split", "decisions")

    def __init__(self, model: str, route: Route, split_type: SplitType) -> None:
        self.route = route
        self.split = split_type(
            route.split,
            salt_for(model),
            [(version, bps, salt_for(model, "shadow", version)) for version, bps in route.shadows],
        )
        self.decisions = tuple(
            Decision(version, "primary", shadows, "split")
            for version, shadows in outcome_table(self.split.versions, self.split.shadow_versions)
        )


class RouteTable:
    """Every model's route at one table version, compiled for `decide`. Immutable."""

    __slots__ = ("version", "_routes", "_compiled")

    def __init__(self, routes: Mapping[str, Route] | None = None, version: int = 0, split_type: SplitType = Split):
        self.version = version
        self._routes: Mapping[str, Route] = MappingProxyType(dict(routes or {}))
        self._compiled = {model: _Compiled(model, route, split_type) for model, route in self._routes.items()}

    @property
    def routes(self) -> Mapping[str, Route]:
        """Model → route, for models that have one (read-only)."""
        return self._routes

    def route(self, model: str) -> Route | None:
        return self._routes.get(model)

    def sticky_key(self, model: str) -> StickyKey | None:
        """Where to take the model's routing key from, if its route is sticky."""
        route = self._routes.get(model)
        return None if route is None else route.sticky_key

    def decide(
        self,
        model: str,
        versions_available: Sequence[str],
        routing_key: str | None = None,
        requested_version: str = "",
        override_version: str | None = None,
        caller_roles: AbstractSet[str] = frozenset(),
    ) -> Decision:
        """The version that answers this request and the shadows it is mirrored to.

        `versions_available`: the model's ready versions in repository order (highest last), served when
        the model has no route. `routing_key`: the sticky key's value, None or "" for a random pick.
        `requested_version`: the request's `model_version` (pins, if the route allows it).
        `override_version`: the `x-route-version` header, for callers with one of the route's override
        roles (`caller_roles`: the caller's roles including implied ones, `Identity.roles`).

        Pinned and overridden versions are not checked against `versions_available`: the repository's
        lookup says better whether such a version is unknown (NOT_FOUND) or still loading (UNAVAILABLE).
        Shadows fire for routed traffic only; pinned and overridden requests are not the population the
        split serves.
        """
        compiled = self._compiled.get(model)
        if override_version:
            allowed = DEFAULT_OVERRIDE_ROLES if compiled is None else compiled.route.override_roles
            if allowed.isdisjoint(caller_roles):
                if not allowed:
                    raise PermissionDenied(f"{OVERRIDE_HEADER}: model {model!r} allows no role to override its route")
                needed = " or ".join(sorted(allowed))
                if not caller_roles:
                    raise Unauthenticated(f"{OVERRIDE_HEADER}: overriding the route needs a token with role {needed}")
                raise PermissionDenied(f"{OVERRIDE_HEADER}: overriding the route of {model!r} needs role {needed}")
            if requested_version and requested_version != override_version:
                raise InvalidArgument(
                    f"{OVERRIDE_HEADER}: {override_version!r} contradicts model_version {requested_version!r}"
                )
            return Decision(override_version, "primary", (), "override")
        if requested_version:
            if compiled is not None and not compiled.route.allow_pinning:
                raise FailedPrecondition(
                    f"model_version: model {model!r} does not allow pinning a version (asked for "
                    f"{requested_version!r}); leave model_version empty to be routed"
                )
            return Decision(requested_version, "primary", (), "pinned")
        if compiled is None:
            if not versions_available:
                raise Unavailable(f"model {model!r} has no ready version")
            return Decision(versions_available[-1], "primary", (), "default")
        if routing_key:
            return compiled.decisions[compiled.split.outcome(routing_key)]
        return compiled.decisions[compiled.split.outcome_random()]
