"""Routes as data: the CLI forms, normal form, and validation errors that name the field and the value."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument
from router.rules import (
    Route,
    StickyKey,
    format_percent,
    format_weights,
    highest,
    parse_shadows,
    parse_split,
    promote,
    validate,
)

READY = {"credit": {"1", "2", "3"}}


def test_parse_split_reads_percentages_with_two_decimals_as_basis_points() -> None:
    assert parse_split("1=90 2=10") == (("1", 9000), ("2", 1000))
    assert parse_split(["1=99.5", "2=0.5"]) == (("1", 9950), ("2", 50))
    assert parse_split("1=87.75 2=12.25") == (("1", 8775), ("2", 1225))
    assert parse_split("1=100 2=0") == (("1", 10000), ("2", 0))
    assert parse_shadows("3=50") == (("3", 5000),)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("1=90.125 2=9.875", "'90.125'"),
        ("1=ninety", "'ninety'"),
        ("=90", "'=90'"),
        ("1", "'1'"),
        ("1=101", "101% is above 100%"),
        ("1=-5", "'-5'"),
        ("1=\u0661\u0660", "'\u0661\u0660'"),  # Arabic-Indic digits: a regex's \d reads them as 10
        ("", "empty"),
    ],
)
def test_parse_split_errors_name_the_field_and_value(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_split(text)
    assert e.value.message.startswith("split")
    assert fragment in e.value.message
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_percentages_format_back_to_the_shortest_form() -> None:
    assert [format_percent(b) for b in (10000, 9000, 50, 1225, 5, 0)] == ["100", "90", "0.5", "12.25", "0.05", "0"]
    assert format_weights(parse_split("1=87.5 2=12.5")) == "1=87.5 2=12.5"


def test_routes_are_stored_in_normal_form() -> None:
    route = Route(split=(("10", 1000), ("9", 0), ("2", 9000)), shadows=(("3", 0),))
    assert route.split == (("2", 9000), ("10", 1000))  # repository order, zero weights dropped
    assert route.shadows == ()
    assert route == Route(split=(("2", 9000), ("10", 1000)))
    assert route.versions == {"2", "10"}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"split": (("1", 9000), ("2", 900))}, "split: weights sum to 99% (9900 bps)"),
        ({"split": (("1", 5000), ("1", 5000))}, "split: version '1' appears more than once"),
        ({"split": (("1", 10001),)}, "split: version '1' has weight 10001"),
        ({"split": (("1", 9999.0), ("2", 1))}, "split: version '1' has weight 9999.0"),
        ({"split": (("1", True),)}, "split: version '1' has weight True"),
        ({"split": (("1 2", 10000),)}, "split: version '1 2'"),
        ({"split": ()}, "split: no version has a weight above 0"),
        ({"split": (("1", 10000),), "shadows": (("2", 20000),)}, "shadows: version '2' has weight 20000"),
        ({"split": (("1", 10000),), "shadows": (("1", 5000),)}, "shadows: version '1' already serves all traffic"),
        ({"split": (("1", 10000),), "shadows": tuple((str(i), 1) for i in range(2, 11))}, "shadows: 9 shadow"),
        ({"split": (("1", 10000),), "override_roles": frozenset({"root"})}, "override_roles: 'root' is not a role"),
        ({"split": (("1", 10000),), "override_roles": "admin"}, "override_roles: 'admin'"),
        ({"split": (("1", 10000),), "allow_pinning": "no"}, "allow_pinning: 'no'"),
    ],
)
def test_invalid_routes_cannot_be_built(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        Route(**kwargs)
    assert fragment in e.value.message


def test_a_shadow_may_mirror_to_a_version_that_also_takes_a_share() -> None:
    route = Route(split=parse_split("1=90 2=10"), shadows=parse_shadows("2=50"))
    assert route.shadows == (("2", 5000),)


def test_validate_requires_every_version_to_be_ready() -> None:
    validate("credit", Route(split=parse_split("1=90 3=10"), shadows=parse_shadows("2=5")), READY)
    cases = [
        (Route(split=parse_split("1=90 4=10")), "split: model 'credit' version '4' is not ready (ready: 1, 2, 3)"),
        (Route(split=parse_split("1=100"), shadows=parse_shadows("9=1")), "shadows: model 'credit' version '9'"),
    ]
    for route, message in cases:
        with pytest.raises(FailedPrecondition) as e:
            validate("credit", route, READY)
        assert message in e.value.message
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(FailedPrecondition, match="model: 'fraud' has no ready versions"):
        validate("fraud", Route(split=parse_split("1=100")), READY)


def test_a_drained_version_need_not_be_ready() -> None:
    validate("credit", Route(split=parse_split("1=100 7=0")), READY)


@pytest.mark.parametrize(
    "text, source, name",
    [
        ("x-user-id", "metadata", "x-user-id"),
        ("X-User-Id", "metadata", "x-user-id"),
        ("param:user", "parameter", "user"),
    ],
)
def test_sticky_keys_parse_and_print_back(text: str, source: str, name: str) -> None:
    key = StickyKey.parse(text)
    assert (key.source, key.name) == (source, name)
    assert StickyKey.parse(str(key)) == key


@pytest.mark.parametrize("text", ["authorization", "grpc-timeout", "x-trace-bin", "user id", "", "param:", "param:a b"])
def test_unusable_sticky_keys_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="^sticky_key: "):
        StickyKey.parse(text)


def test_routes_round_trip_through_plain_data() -> None:
    route = Route(
        split=parse_split("1=99.5 2=0.5"),
        sticky_key=StickyKey.parse("param:account"),
        shadows=parse_shadows("3=25"),
        allow_pinning=False,
        override_roles=frozenset({"admin", "operator"}),
    )
    data = route.to_dict()
    assert data == {
        "split": [["1", 9950], ["2", 50]],
        "sticky_key": "param:account",
        "shadows": [["3", 2500]],
        "allow_pinning": False,
        "override_roles": ["operator", "admin"],
    }
    assert Route.from_dict(data) == route
    assert Route.from_dict({"split": [["1", 10000]]}) == Route(split=(("1", 10000),))


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({}, "route: field 'split' is required"),
        ({"split": [["1", 10000]], "weights": 1}, "route: unknown field 'weights'"),
        ({"split": [["1"]]}, "split: entry ['1']"),
        ({"split": [["1", 10000]], "sticky_key": 5}, "sticky_key: 5"),
        ({"split": [["1", 10000]], "override_roles": "admin"}, "override_roles: 'admin'"),
    ],
)
def test_malformed_plain_data_is_refused(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(GatewayError) as e:
        Route.from_dict(data)
    assert fragment in e.value.message


def test_promote_gives_all_traffic_to_the_version_and_keeps_the_rest() -> None:
    route = Route(
        split=parse_split("1=90 2=10"),
        sticky_key=StickyKey.parse("x-user-id"),
        shadows=parse_shadows("2=50 3=10"),
        allow_pinning=False,
    )
    promoted = promote(route, "2")
    assert promoted.split == (("2", 10000),)
    assert promoted.shadows == (("3", 1000),)
    assert (promoted.sticky_key, promoted.allow_pinning) == (route.sticky_key, False)


def test_highest_uses_the_repository_order() -> None:
    assert highest(["1", "10", "9", "canary"]) == "10"


def test_only_ascii_digits_make_a_version_a_number() -> None:
    """str.isdigit is true of "²" and "١": read as numbers, "²" crashed int() and "١٠" outranked "1"."""
    assert Route(split=(("10", 5000), ("²", 5000))).split == (("²", 5000), ("10", 5000))  # names before numbers
    assert highest(["1", "١٠"]) == "1"
    with pytest.raises(
        FailedPrecondition, match=r"^shadows: model 'credit' version '²' is not ready \(ready: 1, 2, 3\)"
    ):
        validate("credit", Route(split=parse_split("1=100"), shadows=parse_shadows("²=10")), READY)
