"""A model's route as data: weighted split, sticky key, shadow rules, pin policy, override roles.

Routes are frozen values, checked when built (an invalid Route cannot exist) and checked against the
versions that are ready before they are applied (`validate`), in the spirit of Envoy's route
configuration: traffic rules are data, validated, then swapped in whole. Every error names the field
and the value, as `InvalidArgument` (the change itself is wrong) or `FailedPrecondition` (the change is
fine but the gateway's state refuses it: a version that is not loaded and warmed up).

Normal form: entries of 0 bps are dropped (so `1=100 2=0` drains version 2) and split and shadows are
sorted by version as the repository sorts them. The split's order decides which contiguous bucket range
each version owns (router.bucketing), so sorting makes that independent of how an operator typed the
split: `2=10 1=90` and `1=90 2=10` are the same route and move no key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from gateway.auth import ROLES, Role, check_role
from gateway.errors import FailedPrecondition, InvalidArgument
from router.bucketing import BUCKETS, MAX_SHADOWS

Weights = tuple[tuple[str, int], ...]
"""((version, basis points), ...); 10000 bps = 100%."""

DEFAULT_OVERRIDE_ROLES: frozenset[Role] = frozenset({"operator"})

_VERSION = re.compile(r"[^\s=]+")
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_PARAMETER = re.compile(r"\S+")
_PERCENT = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,2}))?")  # ASCII digits: \d also matches "١٠"


def version_order(version: str) -> tuple[int, str]:
    """Sort key of version names, as the model repository sorts them: numbers by value, names before numbers.

    Only ASCII digits make a number: str.isdigit is also true of "²" and "١", which int() refuses or reads as
    another version's number.
    """
    return (int(version), "") if version.isascii() and version.isdigit() else (-1, version)


def highest(versions: Iterable[str]) -> str:
    """The highest of `versions` in repository order (ValueError when empty)."""
    return max(versions, key=version_order)


@dataclass(frozen=True)
class StickyKey:
    """Where a request's routing key comes from: a gRPC metadata key or a request parameter.

    Written `x-user-id` (metadata) or `param:user_id` (the request's `parameters["user_id"]`).
    """

    PARAM_PREFIX: ClassVar[str] = "param:"

    source: Literal["metadata", "parameter"]
    name: str

    def __post_init__(self) -> None:
        if self.source == "metadata":
            # gRPC delivers metadata keys lowercased; -bin values are bytes; grpc- keys are the transport's;
            # the authorization value is a secret that must not become a logged routing key.
            if (
                not _METADATA_KEY.fullmatch(self.name)
                or self.name.endswith("-bin")
                or self.name.startswith("grpc-")
                or self.name == "authorization"
            ):
                raise InvalidArgument(
                    f"sticky_key: {self.name!r} is not a usable metadata key (lowercase letters, digits, '-', '_', "
                    "'.'; not '-bin', 'grpc-' or 'authorization')"
                )
        elif self.source == "parameter":
            if not _PARAMETER.fullmatch(self.name):
                raise InvalidArgument(f"sticky_key: parameter name {self.name!r} must be non-empty without spaces")
        else:
            raise InvalidArgument(f"sticky_key: source {self.source!r} is not 'metadata' or 'parameter'")

    @classmethod
    def parse(cls, text: str) -> StickyKey:
        """`param:NAME` → a request parameter; anything else → a metadata key (lowercased, as gRPC sends it)."""
        text = text.strip()
        if text.startswith(cls.PARAM_PREFIX):
            return cls("parameter", text[len(cls.PARAM_PREFIX) :])
        return cls("metadata", text.lower())

    def __str__(self) -> str:
        return self.name if self.source == "metadata" else self.PARAM_PREFIX + self.name


def _normal_weights(field_name: str, entries: Iterable[tuple[str, int]], allow_zero_total: bool) -> Weights:
    seen: set[str] = set()
    kept: list[tuple[str, int]] = []
    for entry in entries:
        if not (isinstance(entry, tuple | list) and len(entry) == 2):
            raise InvalidArgument(f"{field_name}: entry {entry!r} is not (version, bps)")
        version, bps = entry
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise InvalidArgument(f"{field_name}: version {version!r} must be a non-empty name without spaces or '='")
        if version in seen:
            raise InvalidArgument(f"{field_name}: version {version!r} appears more than once")
        seen.add(version)
        if not isinstance(bps, int) or isinstance(bps, bool) or not 0 <= bps <= BUCKETS:
            raise InvalidArgument(
                f"{field_name}: version {version!r} has weight {bps!r}; weights are integer bps in [0, {BUCKETS}]"
            )
        if bps:
            kept.append((version, bps))
    if not allow_zero_total and not kept:
        raise InvalidArgument(f"{field_name}: no version has a weight above 0; one must take the traffic")
    return tuple(sorted(kept, key=lambda e: version_order(e[0])))


@dataclass(frozen=True)
class Route:
    """How one model's traffic is routed. Built in normal form; raises InvalidArgument when inconsistent."""

    split: Weights
    sticky_key: StickyKey | None = None
    shadows: Weights = ()
    allow_pinning: bool = True
    override_roles: frozenset[Role] = DEFAULT_OVERRIDE_ROLES

    def __post_init__(self) -> None:
        split = _normal_weights("split", self.split, allow_zero_total=False)
        total = sum(bps for _, bps in split)
        if total != BUCKETS:
            raise InvalidArgument(
                f"split: weights sum to {format_percent(total)}% ({total} bps); they must sum to 100% ({BUCKETS} bps)"
            )
        shadows = _normal_weights("shadows", self.shadows, allow_zero_total=True)
        if len(shadows) > MAX_SHADOWS:
            raise InvalidArgument(f"shadows: {len(shadows)} shadow versions; at most {MAX_SHADOWS}")
        if len(split) == 1 and any(version == split[0][0] for version, _ in shadows):
            raise InvalidArgument(f"shadows: version {split[0][0]!r} already serves all traffic; it cannot shadow it")
        if self.sticky_key is not None and not isinstance(self.sticky_key, StickyKey):
            raise InvalidArgument(f"sticky_key: {self.sticky_key!r} is not a StickyKey")
        if not isinstance(self.allow_pinning, bool):
            raise InvalidArgument(f"allow_pinning: {self.allow_pinning!r} is not a boolean")
        if isinstance(self.override_roles, str):
            raise InvalidArgument(f"override_roles: {self.override_roles!r} is not a set of roles")
        roles = frozenset(check_role(role, "override_roles") for role in self.override_roles)
        # Frozen: normal form is stored through object.__setattr__, once, at construction.
        object.__setattr__(self, "split", split)
        object.__setattr__(self, "shadows", shadows)
        object.__setattr__(self, "override_roles", roles)

    @property
    def versions(self) -> frozenset[str]:
        """Every version this route sends traffic to, primary or shadow (they must stay loaded)."""
        return frozenset(v for v, _ in self.split) | frozenset(v for v, _ in self.shadows)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (msgpack / JSON): the stored and the displayed form."""
        return {
            "split": [[v, bps] for v, bps in self.split],
            "sticky_key": None if self.sticky_key is None else str(self.sticky_key),
            "shadows": [[v, bps] for v, bps in self.shadows],
            "allow_pinning": self.allow_pinning,
            "override_roles": [role for role in ROLES if role in self.override_roles],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Route:
        """The inverse of `to_dict`; InvalidArgument names a missing, unknown or wrong field."""
        fields = {"split", "sticky_key", "shadows", "allow_pinning", "override_roles"}
        unknown = set(data) - fields
        if unknown:
            raise InvalidArgument(f"route: unknown field {sorted(unknown)[0]!r}; fields are {sorted(fields)}")
        if "split" not in data:
            raise InvalidArgument("route: field 'split' is required")
        sticky = data.get("sticky_key")
        if sticky is not None and not isinstance(sticky, str):
            raise InvalidArgument(f"sticky_key: {sticky!r} is not a string")
        roles = data.get("override_roles", sorted(DEFAULT_OVERRIDE_ROLES))
        if not isinstance(roles, list | tuple):
            raise InvalidArgument(f"override_roles: {roles!r} is not a list of roles")
        return cls(
            split=tuple(_entry("split", e) for e in data["split"]),
            sticky_key=None if sticky is None else StickyKey.parse(sticky),
            shadows=tuple(_entry("shadows", e) for e in data.get("shadows", ())),
            allow_pinning=data.get("allow_pinning", True),
            override_roles=frozenset(roles),
        )


def _entry(field_name: str, entry: Any) -> tuple[str, int]:
    if not (isinstance(entry, list | tuple) and len(entry) == 2):
        raise InvalidArgument(f"{field_name}: entry {entry!r} is not [version, bps]")
    return (entry[0], entry[1])


def default_route(version: str) -> Route:
    """All traffic to `version`: what a model without a route does, and the base of its first edit."""
    return Route(split=((version, BUCKETS),))


def promote(route: Route, version: str) -> Route:
    """`route` with `version` taking all traffic; a shadow of that version has nothing left to mirror."""
    return Route(
        split=((version, BUCKETS),),
        sticky_key=route.sticky_key,
        shadows=tuple(s for s in route.shadows if s[0] != version),
        allow_pinning=route.allow_pinning,
        override_roles=route.override_roles,
    )


def validate(model: str, route: Route, ready: Mapping[str, AbstractSet[str]]) -> None:
    """FailedPrecondition unless every version `route` sends traffic to is ready (loaded and warmed up).

    `ready` maps each model to its ready versions.
    """
    available = ready.get(model)
    if not available:
        raise FailedPrecondition(f"model: {model!r} has no ready versions")
    for field_name, entries in (("split", route.split), ("shadows", route.shadows)):
        for version, _ in entries:
            if version not in available:
                ready_list = ", ".join(sorted(available, key=version_order))
                raise FailedPrecondition(
                    f"{field_name}: model {model!r} version {version!r} is not ready (ready: {ready_list})"
                )


def parse_percent(field_name: str, text: str) -> int:
    """A percentage with up to two decimals ("12.25") as basis points (1225), without floating point."""
    match = _PERCENT.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"{field_name}: {text!r} is not a percentage with up to two decimals")
    bps = int(match.group(1)) * 100 + int((match.group(2) or "0").ljust(2, "0"))
    if bps > BUCKETS:
        raise InvalidArgument(f"{field_name}: {text}% is above 100%")
    return bps


def parse_weights(field_name: str, text: str | Sequence[str]) -> Weights:
    """`"1=90 2=10"` (or the CLI's argument list) as ((version, bps), ...) in the order given."""
    tokens = text.split() if isinstance(text, str) else [t for arg in text for t in arg.split()]
    if not tokens:
        raise InvalidArgument(f"{field_name}: empty; expected VERSION=PERCENT ...")
    entries: list[tuple[str, int]] = []
    for token in tokens:
        version, sep, percent = token.partition("=")
        if not sep or not version:
            raise InvalidArgument(f"{field_name}: {token!r} is not VERSION=PERCENT (e.g. 2=0.5)")
        entries.append((version, parse_percent(f"{field_name}[{version}]", percent)))
    return tuple(entries)


def parse_split(text: str | Sequence[str]) -> Weights:
    """The CLI's split form, `"1=90 2=10"`; percentages of all traffic."""
    return parse_weights("split", text)


def parse_shadows(text: str | Sequence[str]) -> Weights:
    """The CLI's shadow form, `"3=50"`: mirror 50% of the model's traffic to version 3."""
    return parse_weights("shadows", text)


def format_percent(bps: int) -> str:
    """Basis points as the shortest percentage: 9000 → "90", 50 → "0.5", 1225 → "12.25"."""
    whole, frac = divmod(bps, 100)
    return f"{whole}.{frac:02d}".rstrip("0").rstrip(".") if frac else str(whole)


def format_weights(weights: Weights) -> str:
    """((version, bps), ...) in the CLI's form, `"1=90 2=10"`."""
    return " ".join(f"{version}={format_percent(bps)}" for version, bps in weights)
