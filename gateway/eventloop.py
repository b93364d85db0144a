"""The event-loop choice, in one place: uvloop (grpc.aio runs on it), asyncio's own loop if asked."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    if use_uvloop:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
