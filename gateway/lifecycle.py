"""Model versions coming and going while the gateway serves: load, replace and unload, live.

A load runs entirely off the event loop (onnxruntime session, warm-up, signature and profile checks in a
thread), and only a version that passed everything is published to routing, in one step on the loop.
An unload first withdraws the version from routing, then waits for the requests that already hold it,
then frees it. A version that a route sends traffic to (primary or shadow, or the highest version of a
model without a route) cannot be unloaded, nor the model's OOD fallback (`ood_fallback_version`). Every
load, replace and unload is a change-log entry with who, why and the file's sha256, like a route edit.
Operations are serialised: one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import AlreadyExists, FailedPrecondition, NotFound
from gateway.repository import ModelRepository, ModelVersion
from router.control import RouteControl
from router.rules import highest
from router.store import MODEL_ACTIONS, ChangeEntry

log = logging.getLogger(__name__)

UNLOAD_WAIT_S = 30.0  # longest an unload waits for the requests that hold the version
WATCHER = "repository-watch"


class ModelLifecycle:
    def __init__(self, repository: ModelRepository, routes: RouteControl, worker: str = "") -> None:
        self._repository = repository
        self._routes = routes
        self._worker = worker  # with several workers: who made a change, so the others follow it
        self._lock = asyncio.Lock()

    def _details(self, version: str, sha256: str) -> dict[str, str]:
        return {"version": version, "sha256": sha256} | ({"worker": self._worker} if self._worker else {})

    async def load(
        self, name: str, version: str, *, who: str, why: str, replace: bool = False, force_signature: bool = False
    ) -> tuple[ModelVersion, ChangeEntry]:
        """Load, warm up, check and publish `<root>/<name>/<version>`.

        A version already loaded is refused (AlreadyExists) unless `replace`, which loads the new file
        beside the old one and swaps them in one step: a served version is immutable by default (its
        sha256 is in every log record it answered).
        """
        async with self._lock:
            current = self._repository.models.get(name, {}).get(version)
            if current is not None and current.state != "FAILED" and not replace:
                raise AlreadyExists(
                    f"model {name!r} version {version!r} is already {current.state} (sha256 {current.sha256[:12]}); "
                    "a served version is immutable: load it with replace to swap in a new file"
                )
            prepared = await asyncio.to_thread(self._repository.prepare, name, version, force_signature)
            if current is not None and current.sha256 == prepared.sha256 and current.ready:
                prepared.close()
                raise AlreadyExists(
                    f"model {name!r} version {version!r}: the file is unchanged (sha256 {current.sha256[:12]})"
                )
            replaced = self._repository.publish(prepared)
            details = self._details(version, prepared.sha256)
            if replaced is not None and replaced.model is not None:
                details["replaced_sha256"] = replaced.sha256
                entry = self._routes.record(name, "replace", who=who, why=why, details=details)
                await self._retire(replaced)
            else:
                entry = self._routes.record(name, "load", who=who, why=why, details=details)
            log.info("model %s version %s loaded by %s: %s (sha256 %s)", name, version, who, why, prepared.sha256[:12])
            return prepared, entry

    async def unload(self, name: str, version: str, *, who: str, why: str) -> tuple[ModelVersion, ChangeEntry]:
        """Withdraw `version` from routing, let its in-flight requests finish, free it."""
        async with self._lock:
            found = self._repository.models.get(name, {}).get(version)
            if found is None:
                raise NotFound(f"model {name!r} has no version {version!r} loaded")
            self._check_unused(found)
            # Logged first: the route store refuses it if a route (changed through another worker a moment
            # ago) sends the version traffic, and then nothing has been withdrawn.
            entry = self._routes.record(name, "unload", who=who, why=why, details=self._details(version, found.sha256))
            self._repository.withdraw(found)
            await self._retire(found)
            log.info("model %s version %s unloaded by %s: %s", name, version, who, why)
            return found, entry

    async def unload_model(self, name: str, *, who: str, why: str) -> list[ChangeEntry]:
        """Unload every version of a model without a route (Triton's unload_model): the model goes away."""
        async with self._lock:
            versions = list(self._repository.models.get(name, {}).values())
            if not versions:
                raise NotFound(f"model_name: unknown model {name!r}")
            if self._routes.route(name) is not None:
                raise FailedPrecondition(
                    f"model {name!r} has a route (operators send it traffic); unload its versions one by one "
                    "after routing traffic away"
                )
            entries = []
            try:
                for version in versions:  # each logged before it is withdrawn, as in `unload`
                    details = self._details(version.version, version.sha256)
                    entries.append(self._routes.record(name, "unload", who=who, why=why, details=details))
                    self._repository.withdraw(version)
            finally:
                for version in versions[: len(entries)]:
                    await self._retire(version)
            log.info("model %s unloaded (all %d versions) by %s: %s", name, len(versions), who, why)
            return entries

    async def follow(self, entries: list[ChangeEntry], own_too: bool = False) -> None:
        """Do what another worker did: its loads, replaces and unloads, read from the change log, so that
        every worker serves the same versions (the same files, checked by sha256). Not logged again.
        `own_too`: also this slot's entries (a restarted worker redoing what its former self did)."""
        for entry in entries:
            details = entry.details or {}
            if entry.action not in MODEL_ACTIONS or "worker" not in details:
                continue
            if details["worker"] == self._worker and not own_too:
                continue
            name, version, sha256 = entry.model, details["version"], details["sha256"]
            async with self._lock:
                current = self._repository.models.get(name, {}).get(version)
                if entry.action == "unload":
                    if current is not None and current.sha256 == sha256:
                        self._repository.withdraw(current)
                        await self._retire(current)
                        log.info("model %s version %s unloaded, following change %d", name, version, entry.seq)
                    continue
                if current is not None and current.sha256 == sha256 and current.ready:
                    continue
                try:
                    prepared = await asyncio.to_thread(self._repository.prepare, name, version, True)
                except (FailedPrecondition, NotFound) as e:
                    log.error("model %s version %s: cannot follow change %d: %s", name, version, entry.seq, e)
                    continue
                if prepared.sha256 != sha256:
                    prepared.close()
                    log.error(
                        "model %s version %s changed on disk since change %d; not loaded", name, version, entry.seq
                    )
                    continue
                replaced = self._repository.publish(prepared)
                if replaced is not None and replaced.model is not None:
                    await self._retire(replaced)
                log.info("model %s version %s loaded, following change %d", name, version, entry.seq)

    def in_use(self, version: ModelVersion) -> str:
        """Why a route (or the OOD policy) still needs `version` ('' when none does)."""
        serving = version.serving
        if serving.ood_policy == "fallback" and serving.ood_fallback_version == version.version:
            return f"models.{version.name}.ood_fallback_version names it: it answers out-of-distribution requests"
        route = self._routes.route(version.name)
        if route is not None:
            if any(v == version.version and bps > 0 for v, bps in route.split):
                return "its route's split sends it traffic"
            if any(v == version.version and bps > 0 for v, bps in route.shadows):
                return "its route shadows traffic to it"
            return ""
        ready = self._repository.ready_versions(version.name)
        if version.ready and ready and highest(ready) == version.version:
            return "the model has no route, so its highest version serves all its traffic"
        return ""

    def _check_unused(self, version: ModelVersion) -> None:
        reason = self.in_use(version)
        if reason:
            raise FailedPrecondition(
                f"model {version.name!r} version {version.version!r} cannot be unloaded: {reason}; "
                "route its traffic elsewhere first"
            )

    async def _retire(self, version: ModelVersion) -> None:
        """Free a version no longer routable, once the requests holding it are done."""
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while version.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if version.in_flight:
            log.warning(
                "model %s version %s: %d requests still running after %.0f s; freeing it anyway",
                version.name,
                version.version,
                version.in_flight,
                UNLOAD_WAIT_S,
            )
        # Its batcher's thread may still be finishing a run: closing waits for it, so not on the loop.
        version.state = "UNLOADING"
        await asyncio.to_thread(self._repository.remove, version)

    async def load_new(self) -> list[str]:
        """Load every version directory that appeared in the repository (the watcher's step)."""
        loaded = []
        for name, versions in self._repository.on_disk().items():
            known = self._repository.models.get(name, {})
            for version in versions:
                if version in known:
                    continue
                try:
                    await self.load(name, version, who=WATCHER, why="a new version directory appeared")
                    loaded.append(f"{name}/{version}")
                except (FailedPrecondition, NotFound, AlreadyExists) as e:
                    log.error("model %s version %s found in the repository but not loaded: %s", name, version, e)
                    self._remember_failure(name, version, str(e))
        return loaded

    def _remember_failure(self, name: str, version: str, reason: str) -> None:
        """Keep a refused version visible (FAILED, with its reason) so the watcher does not retry it forever."""
        failed = ModelVersion(name, version, self._repository.root / name / version, self._repository.serving(name))
        failed.state, failed.reason = "FAILED", reason
        self._repository.publish(failed)
