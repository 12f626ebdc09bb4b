"""The OpenFGA edge: the only module that talks to OpenFGA.

One :class:`FgaClient` per process holds one connection pool. BatchCheck items get
unique correlation ids and are mapped back by id, never by position; anything the
server does not answer for an item is an error for that item. Every SDK, transport
or decoding failure goes through :func:`fga_errors`, which turns it into
:class:`AuthorizationUnavailable`: a request that meets it returns no content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from openfga_sdk import ClientConfiguration, OpenFgaClient
from openfga_sdk.client.models import (
    ClientListObjectsRequest,
    ClientTuple,
    ClientWriteRequest,
)
from openfga_sdk.client.models.write_conflict_opts import (
    ClientWriteRequestOnDuplicateWrites,
    ClientWriteRequestOnMissingDeletes,
    ConflictOptions,
)
from openfga_sdk.configuration import RetryParams
from openfga_sdk.credentials import CredentialConfiguration, Credentials
from openfga_sdk.exceptions import ApiException, OpenApiException, ValidationException
from openfga_sdk.models.create_store_request import CreateStoreRequest
from openfga_sdk.models.read_request_tuple_key import ReadRequestTupleKey
from openfga_sdk.models.relationship_condition import RelationshipCondition
from openfga_sdk.models.write_authorization_model_request import (
    WriteAuthorizationModelRequest,
)
from yarl import URL

from gateway import tracing
from gateway.cache import (
    Change,
    ChangeProbe,
    DecisionCache,
    ListKey,
    time_dependent_relations,
)
from gateway.decision import CheckItem, CheckOutcome
from gateway.errors import AuthorizationUnavailable, ConfigurationError, InvalidRequest

MAX_CHECKS_PER_BATCH = 50
MAX_WRITES_PER_REQUEST = 100
STORE_NAME = "scopegate"
# fga_models/scopegate of a source checkout; an installed wheel carries it as gateway/fga_model.
_SHIPPED_MODEL = Path(__file__).resolve().parent / "fga_model" / "model.json"
_CHECKOUT_MODEL = Path(__file__).resolve().parent.parent / "fga_models" / "scopegate" / "model.json"
MODEL_PATH = _SHIPPED_MODEL if _SHIPPED_MODEL.exists() else _CHECKOUT_MODEL
EXPIRY_CONDITION = "not_expired"
# OpenFGA's default --readChanges-max-page-size: larger pages are refused.
CHANGE_LOG_PAGE_SIZE = 100
# Stores made (and deleted) by as-of replays; never the gateway's own store.
SCRATCH_STORE_PREFIX = "scopegate-replay-"

log = logging.getLogger("scopegate.fga")

#: A check as OpenFGA sees it: (user, relation, object). Items with equal questions
#: are sent once.
Question = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Tuple:
    """A relationship tuple in OpenFGA form, optionally with an expiry condition."""

    user: str
    relation: str
    object: str
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LoggedTuple:
    """A tuple as OpenFGA's change log holds it: ``condition`` is the canonical JSON of
    ``{"name", "context"}`` of a conditioned write, or None."""

    user: str
    relation: str
    object: str
    condition: str | None = None


@dataclass(frozen=True, slots=True)
class LoggedChange:
    """One entry of OpenFGA's change log: ``operation`` is ``write`` or ``delete``;
    ``timestamp`` is when OpenFGA stored it (deletes carry no condition)."""

    timestamp: datetime
    operation: str
    tuple: LoggedTuple


@dataclass(slots=True)
class FgaStats:
    """Round trips made, for benchmarks and tests (not thread-safe; one event loop).

    ``checks_requested`` counts items handed to :meth:`FgaClient.batch_check`;
    ``checks_sent`` the ones that reached OpenFGA after de-duplication and the cache;
    ``list_cache_hits`` ListObjects answers taken from the exact cache (not counted in
    ``list_objects_calls``); ``server_cache_checks`` checks sent as ``MINIMIZE_LATENCY``
    under the quiet-time rule (OpenFGA's check cache may answer them).
    """

    batch_check_calls: int = 0
    checks_requested: int = 0
    checks_sent: int = 0
    cache_hits: int = 0
    list_objects_calls: int = 0
    list_cache_hits: int = 0
    server_cache_checks: int = 0

    def snapshot(self) -> FgaStats:
        return replace(self)

    def since(self, before: FgaStats) -> FgaStats:
        """Counters accumulated after ``before`` was taken."""
        return FgaStats(
            *(getattr(self, f.name) - getattr(before, f.name) for f in fields(FgaStats))
        )


@dataclass(frozen=True, slots=True)
class ListObjectsResult:
    """``truncated``: the answer may be partial (a cap or a deadline was hit)."""

    ids: frozenset[str]
    truncated: bool
    elapsed_s: float = 0.0


def remaining(deadline: float | None, cap: float) -> float:
    """Seconds left before ``deadline`` (monotonic), at most ``cap``; raise when none."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise AuthorizationUnavailable("request deadline exceeded before calling OpenFGA")
    return min(cap, left)


@contextlib.contextmanager
def fga_errors(action: str) -> Any:
    """Translate every failure talking to OpenFGA into AuthorizationUnavailable."""
    try:
        yield
    except AuthorizationUnavailable:
        raise
    except ValidationException as exc:
        raise AuthorizationUnavailable(
            f"OpenFGA rejected {action}: {exc.status}", detail=_upstream(exc)
        ) from exc
    except ApiException as exc:
        raise AuthorizationUnavailable(
            f"OpenFGA {action} failed with HTTP {exc.status}", detail=_upstream(exc)
        ) from exc
    except TimeoutError as exc:
        raise AuthorizationUnavailable(f"OpenFGA {action} timed out") from exc
    except (OpenApiException, aiohttp.ClientError, OSError) as exc:
        raise AuthorizationUnavailable(
            f"OpenFGA {action} failed: {type(exc).__name__}", detail=_upstream(exc)
        ) from exc
    except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise AuthorizationUnavailable(
            f"OpenFGA {action}: unreadable answer", detail=_upstream(exc)
        ) from exc


def _upstream(exc: Exception) -> str | None:
    """What OpenFGA or the transport said, for the audit record only (it may name
    objects): bounded, and never part of an error's message."""
    return f"{type(exc).__name__}: {exc}"[:500]


def load_model() -> dict[str, Any]:
    """The authorization model shipped in fga_models/ (JSON form of model.fga)."""
    model: dict[str, Any] = json.loads(MODEL_PATH.read_text())
    return model


def _prune(value: Any) -> Any:
    """Drop empty fields, which the server adds on read ("", [], {}, null)."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ("", [], {}, None)}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def model_signature(model: Mapping[str, Any]) -> str:
    """A canonical form of a model, equal for the file and what the server returns."""
    keys = ("schema_version", "type_definitions", "conditions")
    return json.dumps(_prune({k: model.get(k) for k in keys}), sort_keys=True)


def now_context(now: datetime | None = None) -> dict[str, str]:
    """Condition context supplied by the gateway itself, never by clients."""
    moment = now or datetime.now(UTC)
    return {"current_time": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}


class FgaClient:
    """Async OpenFGA client bound to one store and one authorization model."""

    def __init__(
        self,
        api_url: str,
        store_id: str | None = None,
        model_id: str | None = None,
        *,
        timeout_s: float = 2.0,
        max_parallel_batches: int = 4,
        consistency: str = "HIGHER_CONSISTENCY",
        api_token: str | None = None,
        listobjects_deadline_s: float = 2.5,
        listobjects_max_results: int = 1000,
        cache: DecisionCache | None = None,
        exact_cache: bool = False,
        server_cache_quiet_s: float | None = None,
        model: Mapping[str, Any] | None = None,
    ) -> None:
        credentials = None
        if api_token:
            credentials = Credentials(
                method="api_token", configuration=CredentialConfiguration(api_token=api_token)
            )
        self._config = ClientConfiguration(
            api_url=api_url,
            store_id=store_id,
            authorization_model_id=model_id,
            timeout_millisec=max(1, int(timeout_s * 1000)),
            retry_params=RetryParams(max_retry=0),
            credentials=credentials,
        )
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self.consistency = consistency
        # What the server is configured with (--listObjects-deadline, --listObjects-max-
        # results): an answer that reaches either may be partial.
        self.listobjects_deadline_s = listobjects_deadline_s
        self.listobjects_max_results = listobjects_max_results
        # The exact cache (gateway/cache.py) is read only by requests that a change
        # probe vouched for; a bounded cache set later (service) replaces it.
        if cache is None and exact_cache:
            cache = DecisionCache(load_model(), exact=True)
        self.cache = cache
        # OpenFGA's own check query cache: after this long with no change in the store,
        # every entry it holds was computed after the last change (docs/cache.md).
        # None: never ask for it.
        self.server_cache_quiet_s = server_cache_quiet_s
        # Checks of relations that can never reach a conditional tuple are sent without
        # the clock, so OpenFGA's cache can reuse their answers across requests. Read from
        # the model this client checks against (``model``; default: the shipped one).
        self._timed = time_dependent_relations(model if model is not None else load_model())
        self._probe: ChangeProbe | None = None
        self._api_token = api_token
        self._parallel = asyncio.Semaphore(max_parallel_batches)
        self._client: OpenFgaClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._proxy: tuple[Any, aiohttp.BasicAuth | None] = (None, None)
        self.stats = FgaStats()

    @property
    def client(self) -> OpenFgaClient:
        if self._client is None:
            self._client = OpenFgaClient(self._config)
        return self._client

    @property
    def store_id(self) -> str:
        return str(self._config.store_id or "")

    @property
    def change_probe(self) -> ChangeProbe | None:
        """The per-request freshness probe of the exact cache (None in other modes)."""
        cache = self.cache
        if cache is None or not cache.exact:
            return None
        if self._probe is None or self._probe.cache is not cache:
            self._probe = ChangeProbe(self, cache)
        return self._probe

    def server_cache_ready(self) -> bool:
        """Whether OpenFGA's check cache can hold no answer older than the last change:
        the exact cache's probe has seen no change for ``server_cache_quiet_s``. Only
        for a request that its own probe has just vouched for."""
        quiet = self.server_cache_quiet_s
        probe = self._probe
        return quiet is not None and probe is not None and probe.quiet_for() >= quiet

    @property
    def model_id(self) -> str:
        return str(self._config.authorization_model_id or "")

    @property
    def _http(self) -> aiohttp.ClientSession:
        """The connection pool of the decision path's calls (BatchCheck, ListObjects,
        ReadChanges). The environment's proxy for OpenFGA is read once, here: a session
        that trusts the environment reads it, and ``~/.netrc``, in a worker thread on
        every call."""
        if self._session is None:
            with contextlib.suppress(LookupError):
                self._proxy = get_env_proxy_for_url(URL(self.api_url))
            connector = aiohttp.TCPConnector(limit=self._config.connection_pool_maxsize)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def _request(
        self,
        method: str,
        url: str,
        payload: str | None,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one decision-path call (each is a read) and return its response.

        A kept-alive connection that OpenFGA, or a proxy between, closed just as it was
        reused fails while the request is written; the call is then sent once more on a
        fresh connection, as aiohttp itself does for idempotent methods. A connection
        that cannot be opened is not retried, and a second failure is raised."""
        proxy, proxy_auth = self._proxy

        async def send() -> aiohttp.ClientResponse:
            return await self._http.request(
                method,
                url,
                data=payload,
                params=params,
                headers=headers,
                proxy=proxy,
                proxy_auth=proxy_auth,
            )

        try:
            return await send()
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return await send()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> FgaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- store and model -------------------------------------------------------------

    async def ensure_store_and_model(self, store_name: str = STORE_NAME) -> tuple[str, str]:
        """Reuse the named store and its latest model; write a model only if it changed."""
        with fga_errors("store bootstrap"):
            if not self._config.store_id:
                stores = await self.client.list_stores({"name": store_name})
                matches = [s for s in stores.stores if s.name == store_name]
                if matches:
                    store_id = sorted(matches, key=lambda s: s.created_at)[0].id
                else:
                    store_id = (
                        await self.client.create_store(CreateStoreRequest(name=store_name))
                    ).id
                self.client.set_store_id(store_id)
                self._config.store_id = store_id
            wanted = load_model()
            if self._config.authorization_model_id:
                return self.store_id, await self._pinned_model(wanted)
            latest = await self._latest_model()
            if latest is not None and model_signature(latest[1]) == model_signature(wanted):
                model_id = latest[0]
            else:
                body = WriteAuthorizationModelRequest(
                    schema_version=wanted["schema_version"],
                    type_definitions=wanted["type_definitions"],
                    conditions=wanted.get("conditions"),
                )
                model_id = (
                    await self.client.write_authorization_model(body)
                ).authorization_model_id
            self.client.set_authorization_model_id(model_id)
        return self.store_id, model_id

    async def _pinned_model(self, wanted: Mapping[str, Any]) -> str:
        """Use the pinned model as it is: never replaced, and refused if it is not ours."""
        model_id = str(self._config.authorization_model_id)
        try:
            response = await self.client.read_authorization_model()
        except ApiException as exc:
            if exc.status in (400, 404):
                raise ConfigurationError(
                    f"SCOPEGATE_OPENFGA_MODEL_ID {model_id} is not a model of store "
                    f"{self.store_id}: write fga_models/scopegate/model.fga and pin its id"
                ) from exc
            raise
        model = response.authorization_model
        data = self.client._api_client.sanitize_for_serialization(model) if model else {}
        if model_signature(data) != model_signature(wanted):
            raise ConfigurationError(
                f"the pinned model {model_id} is not the model this gateway decides with "
                "(fga_models/scopegate/model.fga): write that model and pin its id"
            )
        return model_id

    async def _latest_model(self) -> tuple[str, dict[str, Any]] | None:
        try:
            response = await self.client.read_latest_authorization_model()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        model = response.authorization_model
        if model is None:
            return None
        data = self.client._api_client.sanitize_for_serialization(model)
        return str(model.id), data

    # -- checks ----------------------------------------------------------------------

    async def batch_check(
        self,
        items: Iterable[CheckItem],
        *,
        context: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        consistency: str | None = None,
        contextual: Sequence[Tuple] = (),
        deadline: float | None = None,
        fresh: bool = False,
        server_cache: bool = False,
    ) -> dict[CheckItem, CheckOutcome]:
        """Check every item; return an outcome for each (errors included).

        Items that ask the same question (user, relation, object) are sent once, in
        calls of at most 50 that run in parallel under the client's semaphore.
        ``context`` defaults to the gateway's own clock. The decision cache, when
        configured, answers only checks that use that clock at the client's model with
        the client's default consistency: an explicit ``consistency`` (a request that
        demands ``HIGHER_CONSISTENCY``), ``context``, ``model_id`` or ``contextual``
        bypasses it. An exact cache is read only when ``fresh`` says a change probe
        vouched for this request (answers are stored either way). ``contextual`` tuples
        are for reviewer what-if replays only: they are built by the gateway from a
        reviewer's request and never come from agents.
        ``deadline`` (monotonic seconds) bounds every call. ``server_cache`` asks
        OpenFGA for ``MINIMIZE_LATENCY`` (its check cache) unless ``consistency`` is
        given: only when :meth:`server_cache_ready` said so for this request.
        Raises AuthorizationUnavailable when a whole BatchCheck call fails.
        """
        wanted = list(items)
        self.stats.checks_requested += len(wanted)
        unique = list(dict.fromkeys(_question(item) for item in wanted))
        cache = self._cache_for(context, model_id, consistency, contextual)
        answers: dict[Question, CheckOutcome] = {}
        if cache is None:
            sent_context = dict(context) if context is not None else now_context()
        else:
            at = cache.evaluation_time()
            sent_context = now_context(at)
            generation = cache.generation
            keys = {q: cache.key(self.store_id, self.model_id, *q, at) for q in unique}
            for question, key in keys.items() if fresh or not cache.exact else ():
                hit = cache.get(key)
                if hit is not None:
                    answers[question] = CheckOutcome(hit)
            self.stats.cache_hits += len(answers)
        missing = [q for q in unique if q not in answers]
        # The gateway's own clock, at its own model, is left out of the checks that
        # cannot depend on it; a caller's context or another model keeps it everywhere.
        timeless = context is None and model_id in (None, self.model_id) and not contextual
        if consistency is None and server_cache:
            consistency = "MINIMIZE_LATENCY"
            self.stats.server_cache_checks += len(missing)
        fetched = await self._send(
            missing, sent_context, model_id, consistency, contextual, deadline, timeless
        )
        answers.update(fetched)
        if cache is not None:
            for question, outcome in fetched.items():
                if outcome.allowed is not None:
                    cache.put(keys[question], outcome.allowed, generation)
        return {item: answers[_question(item)] for item in wanted}

    def cached(self, items: Iterable[CheckItem]) -> dict[CheckItem, CheckOutcome]:
        """What the exact cache knows of ``items``, sending nothing: only for a request
        that a change probe vouched for (see :class:`gateway.cache.ChangeProbe`)."""
        cache = self._cache_for(None, None, None, ())
        if cache is None or not cache.exact:
            return {}
        at = cache.evaluation_time()
        known: dict[CheckItem, CheckOutcome] = {}
        for item in items:
            hit = cache.get(cache.key(self.store_id, self.model_id, *_question(item), at))
            if hit is not None:
                known[item] = CheckOutcome(hit)
        self.stats.cache_hits += len(known)
        return known

    def _cache_for(
        self,
        context: Mapping[str, Any] | None,
        model_id: str | None,
        consistency: str | None,
        contextual: Sequence[Tuple],
    ) -> DecisionCache | None:
        cache = self.cache
        if (
            cache is None
            or context is not None
            or consistency is not None
            or contextual
            or not self.model_id
            or model_id not in (None, self.model_id)
        ):
            return None
        return cache if cache.exact or cache.usable() else None

    async def _send(
        self,
        questions: Sequence[Question],
        context: Mapping[str, Any],
        model_id: str | None,
        consistency: str | None,
        contextual: Sequence[Tuple],
        deadline: float | None,
        timeless: bool = False,
    ) -> dict[Question, CheckOutcome]:
        chunks = [
            questions[i : i + MAX_CHECKS_PER_BATCH]
            for i in range(0, len(questions), MAX_CHECKS_PER_BATCH)
        ]
        results = await asyncio.gather(
            *(
                self._batch(chunk, context, model_id, consistency, contextual, deadline, timeless)
                for chunk in chunks
            )
        )
        outcomes: dict[Question, CheckOutcome] = {}
        for part in results:
            outcomes.update(part)
        return outcomes

    async def _batch(
        self,
        chunk: Sequence[Question],
        context: Mapping[str, Any],
        model_id: str | None,
        consistency: str | None,
        contextual: Sequence[Tuple],
        deadline: float | None,
        timeless: bool = False,
    ) -> dict[Question, CheckOutcome]:
        """One BatchCheck call as plain JSON on the client's connection pool: building
        and parsing the SDK's request and response models cost more CPU than the call."""
        by_id = {f"c{i}": question for i, question in enumerate(chunk)}
        extra = (
            {
                "tuple_keys": [
                    {"user": t.user, "relation": t.relation, "object": t.object} for t in contextual
                ]
            }
            if contextual
            else None
        )
        checks = []
        for cid, (user, relation, obj) in by_id.items():
            check: dict[str, Any] = {
                "tuple_key": {"user": user, "relation": relation, "object": obj},
                "correlation_id": cid,
            }
            if not timeless or (obj.partition(":")[0], relation) in self._timed:
                check["context"] = dict(context)
            if extra is not None:
                check["contextual_tuples"] = extra
            checks.append(check)
        body: dict[str, Any] = {
            "checks": checks,
            "consistency": consistency or self.consistency,
        }
        if model_id or self.model_id:
            body["authorization_model_id"] = model_id or self.model_id
        async with self._parallel:
            timeout = remaining(deadline, self.timeout_s)
            self.stats.batch_check_calls += 1
            self.stats.checks_sent += len(chunk)
            attributes = {"scopegate.checks": len(chunk)}
            with (
                tracing.span("openfga.BatchCheck", attributes, kind=tracing.CLIENT),
                fga_errors("BatchCheck"),
            ):
                answer = await self._call_json("BatchCheck", "POST", "batch-check", timeout, body)
                answered = _batch_results(answer)
        return {question: _outcome(answered.get(cid)) for cid, question in by_id.items()}

    async def _call_json(
        self,
        action: str,
        method: str,
        path: str,
        timeout: float,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        *,
        traced: bool = True,
    ) -> Any:
        """One call to ``/stores/{store}/{path}`` on the decision path's connection pool
        (:attr:`_http`), bounded by ``timeout``; the decoded JSON of a 200 answer. Any
        other status raises AuthorizationUnavailable (OpenFGA's text goes to the error's
        detail only); transport and decoding errors are left to :func:`fga_errors`.
        ``traced``: carry the current trace (not for calls shared by requests, such as
        change probes)."""
        url = f"{self.api_url}/stores/{self.store_id}/{path}"
        headers = {"Content-Type": "application/json"}
        if traced:
            headers.update(tracing.headers())
        if self._api_token:
            headers["Authorization"] = f"Bearer {self._api_token}"
        payload = json.dumps(body, separators=(",", ":")) if body is not None else None
        async with asyncio.timeout(timeout):
            response = await self._request(method, url, payload, headers, params)
            async with response:
                raw = await response.read()
                status = response.status
        if status != 200:
            raise AuthorizationUnavailable(
                f"OpenFGA {action} failed with HTTP {status}",
                detail=raw[:500].decode(errors="replace"),
            )
        return json.loads(raw)

    async def check(self, item: CheckItem, *, context: Mapping[str, Any] | None = None) -> bool:
        """A single check through the batch path; anything but a proven True is False."""
        outcome = (await self.batch_check([item], context=context)).get(item)
        return bool(outcome is not None and outcome.allowed is True)

    # -- listing -----------------------------------------------------------------------

    async def list_objects(
        self,
        user: str,
        relation: str,
        object_type: str,
        *,
        context: Mapping[str, Any] | None = None,
        max_results: int = 1000,
        consistency: str | None = None,
        deadline: float | None = None,
    ) -> ListObjectsResult:
        """ListObjects, flagging answers that may be truncated (never trusted as complete).

        The server stops at its max results or at its deadline and still answers 200:
        an answer holding ``min(max_results, server max results)`` objects, or one that
        arrived near the server deadline, may be partial.
        """
        request = ClientListObjectsRequest(
            user=user,
            relation=relation,
            type=object_type,
            context=dict(context) if context is not None else now_context(),
        )
        timeout = remaining(deadline, self.listobjects_deadline_s + self.timeout_s)
        options: dict[str, Any] = {
            "consistency": consistency or self.consistency,
            "_request_timeout": timeout,
        }
        started = time.monotonic()
        self.stats.list_objects_calls += 1
        with tracing.span("openfga.ListObjects", kind=tracing.CLIENT), fga_errors("ListObjects"):
            if tracing.enabled():
                options["headers"] = tracing.headers()
            response = await asyncio.wait_for(
                self.client.list_objects(request, options),
                timeout=timeout,
            )
            objects = [str(o) for o in (response.objects or [])]
        elapsed = time.monotonic() - started
        prefix = f"{object_type}:"
        if any(not o.startswith(prefix) for o in objects):
            raise AuthorizationUnavailable("OpenFGA ListObjects: unexpected object type")
        cap = min(max_results, self.listobjects_max_results)
        truncated = len(objects) >= cap or elapsed >= 0.9 * self.listobjects_deadline_s
        ids = frozenset(o[len(prefix) :] for o in objects)
        return ListObjectsResult(ids, truncated, elapsed)

    async def stream_list_objects(
        self,
        user: str,
        relation: str,
        object_type: str,
        *,
        limit: int,
        budget_s: float | None = None,
        consistency: str | None = None,
        deadline: float | None = None,
        fresh: bool = False,
    ) -> ListObjectsResult:
        """Streamed ListObjects, abandoned after ``limit`` objects or ``budget_s`` seconds.

        The streamed endpoint has no server-side result cap but ends *silently* at the
        server's ListObjects deadline, and the SDK's stream reader logs and swallows
        transport errors, so the stream is read here: an answer is complete only if
        the stream ended cleanly, held at most ``limit`` objects and finished well
        inside both the server deadline and ``budget_s``. Anything else is
        ``truncated``. An error line, an HTTP error or a broken stream raises
        AuthorizationUnavailable.

        With the exact cache, a complete answer is kept and, when ``fresh`` says a
        change probe vouched for this request, answered from the cache.
        """
        cache = self.cache if consistency is None and self.model_id else None
        cache = cache if cache is not None and cache.exact else None
        key = ListKey(self.store_id, self.model_id, user, relation, object_type)
        if cache is not None and fresh:
            cached = cache.get_list(key)
            if cached is not None:
                self.stats.list_cache_hits += 1
                return ListObjectsResult(cached, len(cached) > limit)
        generation = cache.generation if cache is not None else 0
        result = await self._stream(
            user, relation, object_type, limit, budget_s, consistency, deadline
        )
        if cache is not None and not result.truncated:
            cache.put_list(key, result.ids, generation)
        return result

    @property
    def keeps_lists(self) -> bool:
        """Whether complete ListObjects answers are kept (the exact cache, a known model)."""
        return self.cache is not None and self.cache.exact and bool(self.model_id)

    def kept_list(self, user: str, relation: str, object_type: str) -> frozenset[str] | None:
        """The exact cache's complete ListObjects answer, counted as a hit: only once this
        request's change probe vouched for the cache (see ``RequestChecks.cache_fresh``)."""
        if self.cache is None or not self.keeps_lists:
            return None
        key = ListKey(self.store_id, self.model_id, user, relation, object_type)
        ids = self.cache.get_list(key)
        if ids is not None:
            self.stats.list_cache_hits += 1
        return ids

    def peek_list(self, user: str, relation: str, object_type: str) -> frozenset[str] | None:
        """The exact cache's complete ListObjects answer, read without a probe: only to
        start work that is thrown away unless a probe then vouches for the same answer."""
        if self.cache is None or not self.keeps_lists:
            return None
        key = ListKey(self.store_id, self.model_id, user, relation, object_type)
        return self.cache.peek_list(key)

    async def _stream(
        self,
        user: str,
        relation: str,
        object_type: str,
        limit: int,
        budget_s: float | None,
        consistency: str | None,
        deadline: float | None,
    ) -> ListObjectsResult:
        server_safe = 0.9 * self.listobjects_deadline_s
        budget = remaining(deadline, min(budget_s or server_safe, server_safe))
        body = {
            "authorization_model_id": self.model_id or None,
            "type": object_type,
            "relation": relation,
            "user": user,
            "context": now_context(),
            "consistency": consistency or self.consistency,
        }
        found: set[str] = set()
        complete = False
        self.stats.list_objects_calls += 1
        started = time.monotonic()
        with (
            tracing.span("openfga.StreamedListObjects", kind=tracing.CLIENT),
            fga_errors("StreamedListObjects"),
        ):
            try:
                async with asyncio.timeout(budget):
                    complete = await self._read_stream(body, f"{object_type}:", limit, found)
            except TimeoutError:
                complete = False
        elapsed = time.monotonic() - started
        truncated = not complete or elapsed >= server_safe
        return ListObjectsResult(frozenset(found), truncated, elapsed)

    async def _read_stream(
        self, body: Mapping[str, Any], prefix: str, limit: int, found: set[str]
    ) -> bool:
        """Read ``{"result": {"object": ...}}`` lines; False once more than ``limit``."""
        url = f"{self.api_url}/stores/{self.store_id}/streamed-list-objects"
        headers = {"Content-Type": "application/json", **tracing.headers()}
        if self._api_token:
            headers["Authorization"] = f"Bearer {self._api_token}"
        payload = json.dumps({k: v for k, v in body.items() if v is not None})
        response = await self._request("POST", url, payload, headers)
        async with response:
            if response.status != 200:
                raise AuthorizationUnavailable(
                    f"OpenFGA StreamedListObjects failed with HTTP {response.status}"
                )
            async for line in response.content:
                if not line.strip():
                    continue
                message = json.loads(line)
                obj = message["result"]["object"] if "result" in message else None
                if not isinstance(obj, str) or not obj.startswith(prefix):
                    raise AuthorizationUnavailable(
                        "OpenFGA StreamedListObjects: error or unexpected answer"
                    )
                found.add(obj[len(prefix) :])
                if len(found) > limit:
                    return False
        return True

    async def read_changes(
        self, start_time: datetime, continuation_token: str | None, page_size: int = 100
    ) -> tuple[list[Change], str | None]:
        """One page of the changelog from ``start_time`` (or the token), oldest first.

        Plain JSON, reading only what the decision cache needs (each change's time,
        operation and tuple key): the exact cache's probe calls this once per request
        burst, and the SDK's response models cost more than the call. Anything missing
        or malformed fails the probe (AuthorizationUnavailable), which then vouches for
        nothing.
        """
        with fga_errors("ReadChanges"):
            return _changes(await self._changes_page(start_time, continuation_token, page_size))

    async def _changes_page(
        self, start_time: datetime | None, continuation_token: str | None, page_size: int
    ) -> Any:
        """One ReadChanges page, decoded JSON (read by :func:`_page`)."""
        params = {"page_size": str(page_size)}
        if continuation_token:
            params["continuation_token"] = continuation_token
        elif start_time is not None:
            params["start_time"] = _stamp(start_time)
        return await self._call_json(
            "ReadChanges", "GET", "changes", self.timeout_s, params=params, traced=False
        )

    # -- the change log archive and as-of replays (gateway/changelog.py, replay.py) ---

    async def read_change_log(
        self,
        start_time: datetime | None,
        continuation_token: str | None,
        page_size: int = CHANGE_LOG_PAGE_SIZE,
    ) -> tuple[list[LoggedChange], str | None]:
        """One page of the store's change log, all object types, in OpenFGA's order.

        OpenFGA orders by the ULID it stamps on each change (its write time), answers
        the changes after ``continuation_token`` or, without one, those stamped at or
        after ``start_time`` (the whole log when both are None), and hands the token
        back unchanged when there is nothing newer. Unlike :meth:`read_changes` this
        keeps each written tuple's condition.
        """
        with fga_errors("ReadChanges"):
            entries, token = _page(
                await self._changes_page(start_time, continuation_token, page_size)
            )
            return [_logged_change(e) for e in entries], token

    def detached(self) -> FgaClient:
        """A client on the same store and model with its own connection pool.

        For background work (the change-log archiver), so that it never queues behind,
        or holds connections of, the retrieval path.
        """
        return FgaClient(
            self.api_url,
            self.store_id or None,
            self.model_id or None,
            timeout_s=self.timeout_s,
            api_token=self._api_token,
        )

    async def read_model(self, model_id: str) -> dict[str, Any]:
        """An authorization model of this store, in the JSON form of ``model.json``."""
        with fga_errors("ReadAuthorizationModel"):
            response = await asyncio.wait_for(
                self.client._api.read_authorization_model(
                    model_id, _request_timeout=self.timeout_s
                ),
                timeout=self.timeout_s,
            )
            model = response.authorization_model
            if model is None:
                raise AuthorizationUnavailable(f"OpenFGA has no model {model_id}")
            data: dict[str, Any] = self.client._api_client.sanitize_for_serialization(model)
            return data

    @contextlib.asynccontextmanager
    async def scratch_store(self, model: Mapping[str, Any]) -> AsyncIterator[FgaClient]:
        """A new, empty store on the same server holding ``model``, deleted afterwards.

        As-of replays write reconstructed tuples there and ask their checks of it;
        nothing touches the gateway's own store. The store is deleted even when the
        body fails (a failed deletion is logged: the store holds only tuples the
        archive already has).
        """
        name = f"{SCRATCH_STORE_PREFIX}{uuid.uuid4().hex[:16]}"
        with fga_errors("CreateStore"):
            created = await asyncio.wait_for(
                self.client._api.create_store(
                    CreateStoreRequest(name=name), _request_timeout=self.timeout_s
                ),
                timeout=self.timeout_s,
            )
        scratch = FgaClient(
            self.api_url,
            created.id,
            timeout_s=self.timeout_s,
            api_token=self._api_token,
            model=model,
        )
        try:
            body = WriteAuthorizationModelRequest(
                schema_version=model["schema_version"],
                type_definitions=model["type_definitions"],
                conditions=model.get("conditions") or None,
            )
            with fga_errors("WriteAuthorizationModel"):
                written = await scratch.client.write_authorization_model(body)
            scratch.client.set_authorization_model_id(written.authorization_model_id)
            scratch._config.authorization_model_id = written.authorization_model_id
            yield scratch
        finally:
            try:
                with fga_errors("DeleteStore"):
                    await asyncio.wait_for(scratch.client.delete_store(), self.timeout_s)
            except AuthorizationUnavailable as exc:
                log.warning("scratch store %s not deleted: %s", name, exc.message)
            await scratch.close()

    async def remove_stale_scratch_stores(
        self, older_than_s: float = 3600.0, max_pages: int = 20
    ) -> int:
        """Delete scratch stores an interrupted replay left behind; how many.

        Only stores named with :data:`SCRATCH_STORE_PREFIX` and created more than
        ``older_than_s`` ago (a replay takes seconds) are touched.
        """
        cutoff = datetime.now(UTC).timestamp() - older_than_s
        stale: list[str] = []
        token: str | None = None
        with fga_errors("ListStores"):
            for _ in range(max_pages):
                options: dict[str, Any] = {"page_size": 100}
                if token:
                    options["continuation_token"] = token
                page = await asyncio.wait_for(self.client.list_stores(options), self.timeout_s)
                stale += [
                    s.id
                    for s in page.stores or []
                    if s.name.startswith(SCRATCH_STORE_PREFIX)
                    and _utc(s.created_at).timestamp() < cutoff
                ]
                token = page.continuation_token or None
                if not token:
                    break
        for store_id in stale:
            doomed = FgaClient(self.api_url, store_id, api_token=self._api_token)
            try:
                with fga_errors("DeleteStore"):
                    await asyncio.wait_for(doomed.client.delete_store(), self.timeout_s)
            finally:
                await doomed.close()
        return len(stale)

    async def write_logged(self, tuples: Sequence[LoggedTuple]) -> None:
        """Write tuples exactly as the change log holds them (conditions included).

        For scratch stores: in transactions of at most 100, duplicates refused.
        """
        for i in range(0, len(tuples), MAX_WRITES_PER_REQUEST):
            part = tuples[i : i + MAX_WRITES_PER_REQUEST]
            request = ClientWriteRequest(writes=[_logged_client_tuple(t) for t in part])
            with fga_errors("Write"):
                await asyncio.wait_for(self.client.write(request), self.timeout_s * 4)

    # -- writes ----------------------------------------------------------------------

    async def write(self, writes: Sequence[Tuple] = (), deletes: Sequence[Tuple] = ()) -> None:
        """Write and delete tuples idempotently, in transactions of at most 100.

        Order is kept: deletes first (a narrowing lands before any widening), then the
        writes in the order given, so a tuple placed last lands in the last transaction.
        """
        ops: list[tuple[str, Tuple]] = [("d", t) for t in deletes] + [("w", t) for t in writes]
        conflict = ConflictOptions(
            on_duplicate_writes=ClientWriteRequestOnDuplicateWrites.IGNORE,
            on_missing_deletes=ClientWriteRequestOnMissingDeletes.IGNORE,
        )
        for i in range(0, len(ops), MAX_WRITES_PER_REQUEST):
            part = ops[i : i + MAX_WRITES_PER_REQUEST]
            request = ClientWriteRequest(
                writes=[_client_tuple(t) for kind, t in part if kind == "w"] or None,
                deletes=[_client_tuple(t) for kind, t in part if kind == "d"] or None,
            )
            try:
                with fga_errors("Write"):
                    await self.client.write(request, {"conflict": conflict})  # type: ignore[dict-item]
            except AuthorizationUnavailable as exc:
                if isinstance(exc.__cause__, ValidationException):
                    raise InvalidRequest(
                        f"relationship rejected by the model: {exc.__cause__}"
                    ) from exc
                raise

    async def read(
        self, *, user: str | None = None, relation: str | None = None, object: str | None = None
    ) -> list[Tuple]:
        """All tuples matching the filter (paged)."""
        found: list[Tuple] = []
        token: str | None = None
        with fga_errors("Read"):
            while True:
                options: dict[str, Any] = {"page_size": 100}
                if token:
                    options["continuation_token"] = token
                response = await self.client.read(
                    ReadRequestTupleKey(user=user, relation=relation, object=object), options
                )
                for entry in response.tuples or []:
                    key = entry.key
                    found.append(Tuple(key.user, key.relation, key.object))
                token = response.continuation_token
                if not token:
                    return found

    async def healthy(self) -> bool:
        try:
            with fga_errors("health"):
                await asyncio.wait_for(self.client.get_store(), timeout=self.timeout_s)
            return True
        except AuthorizationUnavailable:
            return False


def condition_json(name: str | None, context: Mapping[str, Any] | None) -> str | None:
    """The canonical form of a tuple's condition, or None without one."""
    if not name:
        return None
    body = {"name": name, "context": dict(context or {})}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _logged_change(change: Mapping[str, Any]) -> LoggedChange:
    """One decoded ReadChanges entry, its condition kept (ValueError, KeyError or
    TypeError when it is not one)."""
    key = change["tuple_key"]
    condition = key.get("condition")
    operation = str(change["operation"]).upper()
    if operation.endswith("WRITE"):
        kind = "write"
    elif operation.endswith("DELETE"):
        kind = "delete"
    else:
        raise ValueError(f"unknown change operation {change['operation']!r}")
    fields_ = (key["user"], key["relation"], key["object"])
    if not all(isinstance(f, str) and f for f in fields_):
        raise ValueError("ReadChanges: malformed tuple key")
    logged = LoggedTuple(
        *fields_,
        condition_json(condition.get("name"), condition.get("context")) if condition else None,
    )
    return LoggedChange(_utc(change["timestamp"]), kind, logged)


def _logged_client_tuple(t: LoggedTuple) -> ClientTuple:
    condition = None
    if t.condition is not None:
        body = json.loads(t.condition)
        condition = RelationshipCondition(name=body["name"], context=body["context"] or None)
    return ClientTuple(user=t.user, relation=t.relation, object=t.object, condition=condition)


def _client_tuple(t: Tuple) -> ClientTuple:
    condition = None
    if t.expires_at is not None:
        expires = t.expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        condition = RelationshipCondition(name=EXPIRY_CONDITION, context={"expires_at": expires})
    return ClientTuple(user=t.user, relation=t.relation, object=t.object, condition=condition)


def _question(item: CheckItem) -> Question:
    return (item.user, item.relation, item.object)


def _utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)


def _batch_results(answer: Any) -> dict[str, Any]:
    """The ``result`` map of a BatchCheck answer (ValueError for anything else)."""
    if not isinstance(answer, dict):
        raise ValueError("BatchCheck answer is not an object")
    result = answer.get("result")
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise ValueError("BatchCheck result is not an object")
    return result


def _page(answer: Any) -> tuple[list[Any], str | None]:
    """A ReadChanges answer's entries and continuation token (ValueError when the
    answer or the token is malformed)."""
    if not isinstance(answer, dict):
        raise ValueError("ReadChanges answer is not an object")
    token = answer.get("continuation_token")
    if token is not None and not isinstance(token, str):
        raise ValueError("ReadChanges: malformed continuation token")
    return list(answer.get("changes") or []), token or None


def _changes(answer: Any) -> tuple[list[Change], str | None]:
    """A ReadChanges answer as the decision cache reads it: (changes, continuation
    token); ValueError, KeyError or TypeError when it is not one."""
    entries, token = _page(answer)
    return [_change(e) for e in entries], token


def _change(entry: Any) -> Change:
    """One ReadChanges entry as the decision cache reads it (ValueError, KeyError or
    TypeError when it is not one)."""
    key = entry["tuple_key"]
    fields_ = (key["user"], key["relation"], key["object"], entry["operation"])
    if not all(isinstance(f, str) and f for f in fields_):
        raise ValueError("ReadChanges: malformed change")
    return Change(_utc(entry["timestamp"]), fields_[3], fields_[0], fields_[1], fields_[2])


def _outcome(result: Any) -> CheckOutcome:
    """Map one BatchCheck item result (decoded JSON). Only an explicit
    ``allowed: true`` allows; an item that is not an object is an error."""
    if result is None:
        return CheckOutcome(None, "no answer for this item")
    if not isinstance(result, dict):
        return CheckOutcome(None, "unreadable answer")
    error = result.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        return CheckOutcome(None, str(message or error)[:200])
    allowed = result.get("allowed")
    if allowed is True:
        return CheckOutcome(True)
    if allowed is False or allowed is None:
        # OpenFGA may omit "allowed" when it is false.
        return CheckOutcome(False)
    return CheckOutcome(None, "unreadable answer")
