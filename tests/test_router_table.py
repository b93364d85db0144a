"""The routing decision: default, split, sticky, pinning policy, the override header, shadows, atomic swaps."""

from __future__ import annotations

import threading
from functools import partial

import grpc
import pytest

from gateway.auth import Identity
from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument, Unavailable
from native.routing import Split
from router.bucketing import ReferenceSplit
from router.rules import Route, StickyKey, parse_shadows, parse_split
from router.table import Decision, RouteTable

AVAILABLE = ("1", "2", "3")
OPERATOR = Identity("ci", "operator").roles


def _table(**routes: Route) -> RouteTable:
    return RouteTable(routes, version=1, split_type=partial(Split, seed=3))


def test_a_model_without_a_route_serves_its_highest_version() -> None:
    table = _table()
    assert table.decide("credit", AVAILABLE) == Decision("3", "primary", (), "default")
    assert table.route("credit") is None and table.sticky_key("credit") is None
    with pytest.raises(Unavailable, match="model 'credit' has no ready version"):
        table.decide("credit", ())


def test_routed_requests_go_to_the_versions_of_the_split() -> None:
    table = _table(credit=Route(split=parse_split("1=50 2=50"), sticky_key=StickyKey.parse("x-user-id")))
    assert table.sticky_key("credit") == StickyKey("metadata", "x-user-id")
    random_versions = {table.decide("credit", AVAILABLE).version for _ in range(200)}
    keyed = {table.decide("credit", AVAILABLE, f"user-{i}").version for i in range(200)}
    assert random_versions == keyed == {"1", "2"}
    assert table.decide("credit", AVAILABLE, "user-7").reason == "split"


def test_keyed_decisions_are_the_same_in_fresh_tables_native_or_reference() -> None:
    route = Route(split=parse_split("1=80 2=20"), shadows=parse_shadows("3=30 2=40"))
    native = RouteTable({"credit": route})
    reference = RouteTable({"credit": route}, split_type=ReferenceSplit)
    keys = [f"session-{i}" for i in range(3000)]
    assert [native.decide("credit", AVAILABLE, k) for k in keys] == [
        reference.decide("credit", AVAILABLE, k) for k in keys
    ]
    assert [RouteTable({"credit": route}).decide("credit", AVAILABLE, k) for k in keys[:200]] == [
        native.decide("credit", AVAILABLE, k) for k in keys[:200]
    ]


def test_an_empty_routing_key_is_an_unkeyed_request() -> None:
    table = _table(credit=Route(split=parse_split("1=50 2=50")))
    assert {table.decide("credit", AVAILABLE, "").version for _ in range(200)} == {"1", "2"}


def test_pinning_is_allowed_unless_the_route_forbids_it() -> None:
    open_table = _table(credit=Route(split=parse_split("1=100")))
    assert open_table.decide("credit", AVAILABLE, requested_version="2") == Decision("2", "primary", (), "pinned")
    assert _table().decide("credit", AVAILABLE, requested_version="1").version == "1"
    closed = _table(credit=Route(split=parse_split("1=100"), allow_pinning=False))
    with pytest.raises(FailedPrecondition) as e:
        closed.decide("credit", AVAILABLE, requested_version="2")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_version: model 'credit' does not allow pinning" in e.value.message and "'2'" in e.value.message


def test_the_override_header_needs_one_of_the_routes_roles() -> None:
    table = _table(
        credit=Route(split=parse_split("1=100"), allow_pinning=False),
        fraud=Route(split=parse_split("1=100"), override_roles=frozenset({"admin"})),
        locked=Route(split=parse_split("1=100"), override_roles=frozenset()),
    )
    decision = table.decide("credit", AVAILABLE, override_version="2", caller_roles=OPERATOR)
    assert decision == Decision("2", "primary", (), "override")  # even where pinning is forbidden
    assert table.decide("credit", AVAILABLE, override_version="2", caller_roles=Identity("root", "admin").roles)
    refusals = [
        ("credit", frozenset(), grpc.StatusCode.UNAUTHENTICATED, "x-route-version: overriding the route needs"),
        ("credit", Identity("v", "viewer").roles, grpc.StatusCode.PERMISSION_DENIED, "needs role operator"),
        ("fraud", OPERATOR, grpc.StatusCode.PERMISSION_DENIED, "needs role admin"),
        ("locked", Identity("root", "admin").roles, grpc.StatusCode.PERMISSION_DENIED, "allows no role"),
    ]
    for model, roles, code, fragment in refusals:
        with pytest.raises(GatewayError) as e:
            table.decide(model, AVAILABLE, override_version="2", caller_roles=roles)
        assert e.value.code == code, (model, e.value)
        assert fragment in str(e.value)


def test_an_override_that_contradicts_the_pinned_version_is_refused() -> None:
    table = _table()
    assert table.decide("credit", AVAILABLE, requested_version="2", override_version="2", caller_roles=OPERATOR)
    with pytest.raises(InvalidArgument, match="x-route-version: '2' contradicts model_version '1'"):
        table.decide("credit", AVAILABLE, requested_version="1", override_version="2", caller_roles=OPERATOR)


def test_shadows_fire_for_their_share_consistently_and_never_for_the_answering_version() -> None:
    table = _table(credit=Route(split=parse_split("1=90 2=10"), shadows=parse_shadows("2=50 3=20")))
    keys = [f"user-{i}" for i in range(10_000)]
    decisions = [table.decide("credit", AVAILABLE, k) for k in keys]
    assert decisions == [table.decide("credit", AVAILABLE, k) for k in keys]  # the same key, the same mirrors
    assert all(d.version not in d.shadows for d in decisions)
    on_v1 = [d for d in decisions if d.version == "1"]
    assert 0.46 < sum("2" in d.shadows for d in on_v1) / len(on_v1) < 0.54
    assert 0.17 < sum("3" in d.shadows for d in decisions) / len(decisions) < 0.23
    unkeyed = [table.decide("credit", AVAILABLE) for _ in range(10_000)]
    assert 0.17 < sum("3" in d.shadows for d in unkeyed) / len(unkeyed) < 0.23


def test_pinned_and_overridden_requests_are_not_mirrored() -> None:
    table = _table(credit=Route(split=parse_split("1=100"), shadows=parse_shadows("3=100")))
    assert table.decide("credit", AVAILABLE, "k").shadows == ("3",)
    assert table.decide("credit", AVAILABLE, "k", requested_version="1").shadows == ()
    assert table.decide("credit", AVAILABLE, "k", override_version="1", caller_roles=OPERATOR).shadows == ()


def test_a_request_sees_one_table_or_the_other_while_tables_are_swapped() -> None:
    """The application swaps tables by one assignment; a decision comes whole from one of them."""
    old = _table(credit=Route(split=parse_split("1=100"), shadows=parse_shadows("3=100")))
    new = _table(credit=Route(split=parse_split("2=100"), shadows=parse_shadows("1=100")))
    allowed = {("1", ("3",)), ("2", ("1",))}

    class App:
        routes = old

    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            App.routes = new if App.routes is old else old

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        seen = {(d.version, d.shadows) for d in (App.routes.decide("credit", AVAILABLE) for _ in range(50_000))}
    finally:
        stop.set()
        swapper.join()
    assert seen <= allowed and seen
