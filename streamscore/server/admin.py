"""The ``Admin`` gRPC service: read and change the rollout. Bearer-token protected.

The token comes from settings (``admin_token``, usually ``STREAMSCORE_ADMIN_TOKEN``)
and is compared in constant time. With no token configured every call is refused:
an unauthenticated rollout API on the authorization path is never the default.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from streamscore._proto.v1 import admin_pb2 as apb
from streamscore._proto.v1 import admin_pb2_grpc as apb_grpc
from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.errors import InvalidRequest, ServingError
from streamscore.server.malformed import MalformedRequest
from streamscore.server.metrics import RpcMetrics
from streamscore.server.model import ModelMetadata
from streamscore.server.model_repository import ModelRepository
from streamscore.server.rollout import RolloutManager, RolloutState
from streamscore.server.served_model import ModelLoadError

log = logging.getLogger("streamscore.admin")
auth_log = logging.getLogger("streamscore.auth")


class AdminService(apb_grpc.AdminServicer):
    def __init__(self, rollouts: RolloutManager, token: str) -> None:
        self.rollouts = rollouts
        self._token = token.encode()
        # Every Admin call counted and timed by method and status code, refusals
        # included (streamscore_rpc_seconds{rpc="Admin/..."}), as Scoring's are.
        self._metrics: dict[str, RpcMetrics] = {}

    def _refusal(self, context: grpc.aio.ServicerContext) -> str | None:
        """Why the call is not authorized; None when it is."""
        if not self._token:
            return "admin API disabled: no admin_token configured"
        supplied = b""
        for key, value in context.invocation_metadata() or ():
            # The scheme is case-insensitive (RFC 7235): some clients send "bearer".
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                supplied = value[7:].encode()
        if not hmac.compare_digest(supplied, self._token):
            return "missing or wrong bearer token"
        return None

    async def _call(
        self, rpc: str, context: grpc.aio.ServicerContext, action: Callable[[], Awaitable[Any]]
    ) -> Any:
        started = time.perf_counter()
        metrics = self._metrics.get(rpc) or self._metrics.setdefault(
            rpc, RpcMetrics(f"Admin/{rpc}")
        )
        code, details = grpc.StatusCode.OK, ""
        try:
            refusal = self._refusal(context)
            if refusal is not None:
                # The caller, never the token: a security log must see guessing. At
                # most a line per 10 s (logs.RepeatLimiter), the rest counted there.
                auth_log.warning(
                    "admin call refused: %s", refusal, extra={"rpc": rpc, "peer": context.peer()}
                )
                code, details = grpc.StatusCode.UNAUTHENTICATED, refusal
            else:
                return await action()
        except ServingError as error:  # InvalidRequest, RolloutConflict
            code, details = error.code, str(error)
        except (ModelLoadError, BackendUnavailable) as error:
            # A version the change names does not load here (a corrupt file, Triton
            # down): the caller is told why, the log says so in one line (it was a
            # traceback per refused change).
            log.warning("rollout change refused: %s", self._public(error))
            code = grpc.StatusCode.FAILED_PRECONDITION
            details = f"rollout not changed: {self._public(error)}"
        except (ValueError, KeyError, FileNotFoundError) as error:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, self._public(error)
        except Exception as error:  # a version that fails to load or warm up
            log.exception("rollout change failed")
            code = grpc.StatusCode.FAILED_PRECONDITION
            details = f"rollout not changed: {self._public(error)} (the server's log has more)"
        finally:
            metrics.observe(code.name, time.perf_counter() - started)
        # Set, not context.abort(): see scoring._guard (a reference cycle per refusal).
        context.set_code(code)
        context.set_details(details)
        return None

    async def refuse_malformed(
        self, rpc: str, request: MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """A request that did not parse, answered as any Admin call: a caller without
        the token is refused for that (UNAUTHENTICATED, logged), never told which
        field it got wrong; one with it gets INVALID_ARGUMENT naming the field."""

        async def action() -> None:
            raise InvalidRequest(request.field, request.reason)

        await self._call(rpc, context, action)

    def _public(self, error: BaseException | str) -> str:
        """An error's text without the repository's path, which is no caller's business
        (a load error of onnxruntime names the model file)."""
        repository = str(self.rollouts.registry.repository)
        return str(error).replace(repository, "<model repository>")

    def _metadata(
        self, repository: ModelRepository, name: str, version: str
    ) -> ModelMetadata | str:
        """A version's metadata, or why it cannot be served (a copied directory, its
        metadata.json missing or malformed), without the repository's path."""
        try:
            return repository.metadata(name, version)
        except (ValueError, OSError) as error:
            return self._public(error)

    def status(self) -> apb.RolloutStatus:
        state = self.rollouts.shared
        registry = self.rollouts.registry
        return apb.RolloutStatus(
            rollout=apb.Rollout(
                model_name=registry.name,
                # Empty while it follows the repository's highest version: shown
                # resolved, a floating primary looked pinned, and a change read and
                # written back (rollout set) pinned it.
                primary_version=state.primary,
                serving_primary_version=self.rollouts.primary_model().metadata.version,
                canary_version=state.canary,
                canary_percent=state.canary_percent,
                shadow_versions=list(state.shadows),
                generation=state.generation,
            ),
            candidates=[
                apb.CandidateStats(version=version, variant=variant, stats=stats)
                for version, variant, stats in self.rollouts.candidate_stats()
            ],
            rollbacks=[
                apb.RollbackEvent(
                    version=r.version, reason=r.reason, time_ms=r.time_ms, automatic=r.automatic
                )
                for r in self.rollouts.rollbacks
            ],
            primary_alone_because=self._public(self.rollouts.served_alone_because),
        )

    async def GetRollout(
        self, request: apb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> apb.RolloutStatus:
        async def action() -> apb.RolloutStatus:
            return self.status()

        return await self._call("GetRollout", context, action)

    async def SetRollout(
        self, request: apb.SetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> apb.RolloutStatus:
        async def action() -> apb.RolloutStatus:
            wanted = request.rollout
            self._check_versions(wanted)
            # RolloutState checks these too; here the refusal names the field.
            if not 0.0 <= wanted.canary_percent <= 100.0:
                raise InvalidRequest("rollout.canary_percent", "must be within 0..100")
            if wanted.canary_percent and not wanted.canary_version:
                raise InvalidRequest("rollout.canary_percent", "needs a rollout.canary_version")
            await self.rollouts.set(
                RolloutState(
                    primary=wanted.primary_version,
                    canary=wanted.canary_version,
                    canary_percent=wanted.canary_percent,
                    shadows=tuple(wanted.shadow_versions),
                ),
                expected_generation=request.expected_generation,
            )
            return self.status()

        return await self._call("SetRollout", context, action)

    def _check_versions(self, wanted: apb.Rollout) -> None:
        """Every version named is one in the repository, or the field is refused by
        name (and without the repository's path, which is no caller's business)."""
        name = self.rollouts.registry.name
        if wanted.model_name and wanted.model_name != name:
            raise InvalidRequest("rollout.model_name", f"this server serves {name!r} only")
        repository = ModelRepository(self.rollouts.registry.repository)
        known = set(repository.versions(name))
        named = [
            ("rollout.primary_version", wanted.primary_version),
            ("rollout.canary_version", wanted.canary_version),
            *(
                (f"rollout.shadow_versions[{i}]", version)
                for i, version in enumerate(wanted.shadow_versions)
            ),
        ]
        for i, version in enumerate(wanted.shadow_versions):
            if not version:
                raise InvalidRequest(f"rollout.shadow_versions[{i}]", "must name a version")
        for field, version in named:
            if version and version not in known:
                shown = version if len(version) <= 32 else f"{version[:32]}..."
                raise InvalidRequest(field, f"no version {shown!r} of model {name!r}")
            read = self._metadata(repository, name, version) if version else None
            if isinstance(read, str):
                raise InvalidRequest(field, read)
        # Each version in one role: a canary or shadow of the primary itself, or a
        # shadow twice, would only compare a version with itself.
        # Unpinned, the primary is the repository's highest version (the registry's,
        # not the one pinned now), so a canary or shadow may not name it.
        primary = wanted.primary_version or self.rollouts.registry.primary.metadata.version
        taken = {primary: "the primary"}
        for field, version in named[1:]:
            if not version:
                continue
            if version in taken:
                raise InvalidRequest(field, f"version {version!r} is already {taken[version]}")
            taken[version] = field.removeprefix("rollout.")

    async def ListModels(
        self, request: apb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListModelsResponse:
        async def action() -> apb.ListModelsResponse:
            registry = self.rollouts.registry
            repository = ModelRepository(registry.repository)
            loaded = set(registry.loaded())
            versions = []
            for name in repository.models():
                for version in repository.versions(name):
                    info = apb.ModelVersionInfo(
                        name=name,
                        version=version,
                        loaded=(name, version) in loaded,
                        load_error=self._public(registry.load_error(name, version)),
                    )
                    # A version that cannot be served is listed with why: the caller
                    # sent nothing wrong, and the other versions are still listed.
                    read = self._metadata(repository, name, version)
                    if isinstance(read, str):
                        info.error = read
                    else:
                        info.backend = read.backend
                    versions.append(info)
            return apb.ListModelsResponse(versions=versions)

        return await self._call("ListModels", context, action)

    async def Promote(
        self, request: apb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> apb.RolloutStatus:
        async def action() -> apb.RolloutStatus:
            await self.rollouts.promote()
            return self.status()

        return await self._call("Promote", context, action)

    async def Rollback(
        self, request: apb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> apb.RolloutStatus:
        async def action() -> apb.RolloutStatus:
            await self.rollouts.roll_back(request.reason)
            return self.status()

        return await self._call("Rollback", context, action)
