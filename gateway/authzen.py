"""OpenID AuthZEN Authorization API 1.0: the delegated decision for other enforcement points.

An MCP gateway or an API gateway (the PEP) asks scopegate (the PDP) "may this user,
through this agent, for this task, read this document?" without retrieving anything
(DESIGN section 9). Sections named below are those of the AuthZEN specification.

- ``POST /access/v1/evaluation`` (Access Evaluation API) and ``POST /access/v1/evaluations``
  (Access Evaluations API, with the top-level ``subject``, ``action``, ``resource`` and
  ``context`` as default values and ``options.evaluations_semantic``: ``execute_all``,
  the default, ``deny_on_first_deny`` or ``permit_on_first_permit``); an evaluations
  request without ``evaluations`` behaves as a single evaluation and answers so.
- ``GET /.well-known/authzen-configuration`` (Policy Decision Point Metadata).

Who asks. The caller authenticates with the delegation token, verified as for
``/v1/retrieve`` (Transport: 401 otherwise, with ``WWW-Authenticate``). The agent, the
task and the tenant come from that token only; ``properties`` and ``context`` are
accepted and ignored (unknown members MUST be ignored, JSON Serialization), so nothing
in the body can name another agent or task, supply condition context (the gateway's
clock decides expiry) or widen anything.

What is asked. The subject must be ``{"type": "user", "id": <the token's user>}``.
Any other subject is refused with 403 rather than answered ``false``: the token
authorizes questions about its own delegation only, and an error is not an
authorization outcome (Error Responses), whereas a ``false`` would assert a decision
about a subject that was never evaluated. In an evaluations request a mismatched
top-level subject concerns the whole payload (403); a mismatched per-evaluation subject
is an error of that evaluation, answered ``false`` with ``context.error`` (Errors).
The action ``read`` on resource type ``document`` with a tenant-local document id
(validated as every id is; an invalid one is a 400, or that evaluation's error) is
evaluated; any other action or resource type is answered ``false``.

The answer is the decision of a retrieval: every conjunct of DESIGN section 2, through
OpenFGA, in one BatchCheck round (:meth:`gateway.service.Gateway.evaluate_access`). A
``false`` never says which conjunct failed: that would tell an agent that a document
it may not read exists, which a retrieval never reveals; the audit record (the same
kind as a retrieval's, strategy ``authzen``, replayable by reviewers) has the failed
checks. If OpenFGA cannot answer, the whole call is a 503 ``authorization_unavailable``
in the gateway's error shape (a 5XX concerns the whole payload, Errors): never a
``true``. The record is written before any answer.

Short-circuit semantics are applied to the answer: the array ends at the first
``false`` (deny_on_first_deny; that denial carries ``{"code": "200", "reason":
"deny_on_first_deny"}`` as in the specification's example) or the first ``true``
(permit_on_first_permit). All evaluations are still decided in the same round, and the
record marks which permits were answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import VerifiedAgent, _demanded_consistency
from gateway.decision import DocumentVerdict
from gateway.deps import GatewayDep
from gateway.errors import Forbidden, InvalidIdentifier, InvalidRequest, ScopegateError
from gateway.identity import DelegationContext
from gateway.ids import validate_scoped_id
from gateway.metrics import Metrics
from gateway.ratelimit import RetrievalLimiter
from gateway.service import Gateway

EVALUATION_PATH = "/access/v1/evaluation"
EVALUATIONS_PATH = "/access/v1/evaluations"
METADATA_PATH = "/.well-known/authzen-configuration"
SUBJECT_TYPE = "user"
ACTION = "read"
RESOURCE_TYPE = "document"
MAX_EVALUATIONS = 100
MAX_TEXT = 1024
#: An X-Request-ID worth echoing: printable ASCII, bounded.
MAX_PEP_REQUEST_ID = 256

Semantic = Literal["execute_all", "deny_on_first_deny", "permit_on_first_permit"]
#: The decision at which each semantic stops answering (None: answer every evaluation).
STOP_ON: dict[str, bool | None] = {
    "execute_all": None,
    "deny_on_first_deny": False,
    "permit_on_first_permit": True,
}


class BadRequest(InvalidRequest):
    """AuthZEN's Bad Request (Error Responses): 400 with code ``invalid_request``."""

    status = 400


# -- the information model ------------------------------------------------------------------


class _Open(BaseModel):
    # Receivers MUST ignore unknown members (JSON Serialization).
    model_config = ConfigDict(extra="ignore")


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Properties = dict[str, Any]


class Subject(_Open):
    type: Text
    id: Text
    properties: Properties | None = None


class Resource(_Open):
    type: Text
    id: Text
    properties: Properties | None = None


class Action(_Open):
    name: Text
    properties: Properties | None = None


class EvaluationRequest(_Open):
    """The Access Evaluation request: subject, action and resource required."""

    subject: Subject
    action: Action
    resource: Resource
    context: Properties | None = None


class EvaluationItem(_Open):
    """One member of ``evaluations``: what it omits comes from the top-level defaults."""

    subject: Subject | None = None
    action: Action | None = None
    resource: Resource | None = None
    context: Properties | None = None


class EvaluationsOptions(_Open):
    evaluations_semantic: Semantic = "execute_all"


class EvaluationsRequest(EvaluationItem):
    """The Access Evaluations request: defaults, ``evaluations`` and ``options``."""

    evaluations: list[EvaluationItem] | None = Field(default=None, max_length=MAX_EVALUATIONS)
    options: EvaluationsOptions | None = None


class Decision(BaseModel):
    decision: bool
    context: dict[str, Any] | None = None


class Decisions(BaseModel):
    evaluations: list[Decision]


class Metadata(BaseModel):
    policy_decision_point: str
    access_evaluation_endpoint: str
    access_evaluations_endpoint: str


# -- the mapping (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """An evaluation answered ``false`` without asking OpenFGA.

    ``status`` 400 or 403 makes it an error of that evaluation (the HTTP status of a
    single evaluation, ``context.error`` in an array); None a plain denial.
    """

    status: int | None
    message: str


#: What one evaluation asks OpenFGA: a validated document id, or nothing.
Question = str | Refused

NOT_THE_SUBJECT = Refused(
    403, 'the subject must be {"type": "user", "id": <the user the token delegates>}'
)
NOT_EVALUATED = Refused(None, f"only action {ACTION!r} on resource type {RESOURCE_TYPE!r}")


def completed(request: EvaluationsRequest) -> list[EvaluationRequest]:
    """The evaluations with the top-level default values applied (Default values).

    A member's own key overrides the default whole; a required key missing from both
    is a Bad Request. Without ``evaluations`` the request is one evaluation.
    """
    if not request.evaluations:
        return [_complete(request, request, 0)]
    return [_complete(request, item, i) for i, item in enumerate(request.evaluations)]


def _complete(defaults: EvaluationItem, item: EvaluationItem, index: int) -> EvaluationRequest:
    subject = item.subject if item.subject is not None else defaults.subject
    action = item.action if item.action is not None else defaults.action
    resource = item.resource if item.resource is not None else defaults.resource
    context = item.context if item.context is not None else defaults.context
    if subject is None or action is None or resource is None:
        missing = [
            name
            for name, value in (("subject", subject), ("action", action), ("resource", resource))
            if value is None
        ]
        where = f"evaluations[{index}]: " if defaults is not item else ""
        raise BadRequest(f"{where}{', '.join(missing)} required (no top-level default given)")
    return EvaluationRequest(subject=subject, action=action, resource=resource, context=context)


def is_token_subject(ctx: DelegationContext, subject: Subject) -> bool:
    return subject.type == SUBJECT_TYPE and subject.id == ctx.user


def question(ctx: DelegationContext, evaluation: EvaluationRequest) -> Question:
    """The document this evaluation asks about, or why it is answered without OpenFGA."""
    if not is_token_subject(ctx, evaluation.subject):
        return NOT_THE_SUBJECT
    if evaluation.action.name != ACTION or evaluation.resource.type != RESOURCE_TYPE:
        return NOT_EVALUATED
    try:
        return validate_scoped_id(ctx.tenant, "document", evaluation.resource.id)
    except InvalidIdentifier as exc:
        return Refused(400, exc.message)


def decision(asked: Question, verdict: DocumentVerdict | None) -> Decision:
    """One Decision: ``true`` only for a document whose every conjunct held.

    A denial carries no reason: which conjunct failed is for the audit record.
    """
    if isinstance(asked, Refused):
        if asked.status is None:
            return Decision(decision=False)
        error = {"status": asked.status, "message": asked.message}
        return Decision(decision=False, context={"error": error})
    return Decision(decision=verdict is not None and verdict.allowed)


def decisions(
    asked: Sequence[Question], verdicts: Sequence[DocumentVerdict | None], semantic: str
) -> list[Decision]:
    """The answered prefix of the evaluations (``verdicts`` is as long as that prefix)."""
    answers = [decision(q, v) for q, v in zip(asked, verdicts, strict=False)]
    # The denial that ended a deny_on_first_deny array says so, as in the specification's
    # example (an evaluation's error keeps its own context).
    if semantic == "deny_on_first_deny" and answers and answers[-1] == Decision(decision=False):
        answers[-1] = Decision(
            decision=False, context={"code": "200", "reason": "deny_on_first_deny"}
        )
    return answers


def refusal_error(refused: Refused) -> ScopegateError:
    """A refused single evaluation as the HTTP error it is (403 or 400)."""
    if refused.status == 403:
        return Forbidden(refused.message)
    return BadRequest(refused.message)


def audit_details(
    path: str,
    semantic: str,
    evaluations: Sequence[EvaluationRequest],
    asked: Sequence[Question],
    pep_request_id: str | None,
) -> dict[str, Any]:
    """What the PEP asked, for the record's ``extra`` (ids as sent, bounded)."""
    return {
        "api": "authzen",
        "endpoint": path,
        "semantic": semantic,
        "pep_request_id": pep_request_id,
        "evaluations": [_described(e, q) for e, q in zip(evaluations, asked, strict=True)],
    }


def _described(evaluation: EvaluationRequest, asked: Question) -> dict[str, Any]:
    item: dict[str, Any] = {
        "subject": f"{evaluation.subject.type[:32]}:{evaluation.subject.id[:128]}",
        "action": evaluation.action.name[:64],
        "resource": f"{evaluation.resource.type[:32]}:{evaluation.resource.id[:128]}",
    }
    if isinstance(asked, Refused):
        item["refused"] = {"status": asked.status, "message": asked.message}
    return item


def pep_request_id(value: str | None) -> str | None:
    """The PEP's ``X-Request-ID`` if it is printable ASCII of sane length, else None."""
    if not value or len(value) > MAX_PEP_REQUEST_ID:
        return None
    return value if all(" " <= c <= "~" for c in value) else None


def metadata(base_url: str) -> Metadata:
    """The PDP metadata document for a gateway reached at ``base_url``.

    ``policy_decision_point`` is the URL the document was fetched under, without the
    well-known suffix, which is what a PEP validates it against (Policy Decision Point
    Metadata Validation). No search endpoint is named: the gateway has none.
    """
    pdp = base_url.rstrip("/")
    return Metadata(
        policy_decision_point=pdp,
        access_evaluation_endpoint=pdp + EVALUATION_PATH,
        access_evaluations_endpoint=pdp + EVALUATIONS_PATH,
    )


# -- HTTP -----------------------------------------------------------------------------------


class AuthzenRoute(APIRoute):
    """Body validation failures are AuthZEN's 400 Bad Request, not the API's 422."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()))
                message = f"{where}: {first.get('msg', 'invalid request')}"[:300]
                raise BadRequest(message) from exc

        return route


class AuthzenHeaders:
    """The HTTP binding's headers on the evaluation endpoints.

    The PEP's ``X-Request-ID`` comes back unchanged (Request Identification; the
    gateway's own request id, which names the audit record, is sent when the PEP gave
    none), and a 401 carries ``WWW-Authenticate: Bearer`` (Sender Authentication
    Failure; RFC 6750 ``error="invalid_token"`` when a token was presented).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in (EVALUATION_PATH, EVALUATIONS_PATH):
            await self.app(scope, receive, send)
            return
        sent = {name: value for name, value in scope.get("headers", ())}
        echoed = pep_request_id(sent.get(b"x-request-id", b"").decode("latin-1"))
        challenge = 'Bearer error="invalid_token"' if b"authorization" in sent else "Bearer"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if echoed is not None:
                    headers["x-request-id"] = echoed
                if message["status"] == 401:
                    headers["www-authenticate"] = challenge
            await send(message)

        await self.app(scope, receive, send_with_headers)


def metrics_of(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def register_authzen_routes(app: FastAPI, limiter: RetrievalLimiter) -> None:
    """Attach the AuthZEN endpoints, their metadata document and their headers.

    Evaluations share the agent's retrieval rate limits (``limiter``): one call counts
    as one request, whatever the number of evaluations in it.
    """
    router = APIRouter(route_class=AuthzenRoute, tags=["authzen"])

    def admit(request: Request, ctx: DelegationContext) -> None:
        try:
            limiter.admit(ctx.tenant, ctx.agent)
        except ScopegateError as exc:
            metrics_of(request).count_error(ctx.tenant, exc.code)
            raise

    async def answer(
        request: Request,
        g: Gateway,
        ctx: DelegationContext,
        evaluations: Sequence[EvaluationRequest],
        semantic: str | None = None,
    ) -> list[Decision]:
        """Decide and record; ``semantic`` None: a single evaluation, whose errors are
        the HTTP answer itself."""
        asked = [question(ctx, e) for e in evaluations]
        single = semantic is None
        if single and isinstance(asked[0], Refused) and asked[0].status is not None:
            raise refusal_error(asked[0])
        semantic = semantic or "execute_all"
        metrics = metrics_of(request)
        pep = pep_request_id(request.headers.get("x-request-id"))
        try:
            verdicts = await g.evaluate_access(
                ctx,
                [q if isinstance(q, str) else None for q in asked],
                stop_on=STOP_ON[semantic],
                request_id=request.state.request_id,
                consistency=_demanded_consistency(request),
                details=audit_details(request.url.path, semantic, evaluations, asked, pep),
            )
        except ScopegateError as exc:
            metrics.count_error(ctx.tenant, exc.code)
            raise
        metrics.count_verdicts(ctx.tenant, [v for v in verdicts if v is not None])
        return decisions(asked, verdicts, semantic)

    @router.post(EVALUATION_PATH, response_model_exclude_none=True)
    async def evaluation(
        body: EvaluationRequest, ctx: VerifiedAgent, g: GatewayDep, request: Request
    ) -> Decision:
        """AuthZEN Access Evaluation: may the token's user, through its agent and task,
        read this document? The same decision as a retrieval, audited the same way."""
        admit(request, ctx)
        return (await answer(request, g, ctx, [body]))[0]

    @router.post(EVALUATIONS_PATH, response_model_exclude_none=True)
    async def evaluations(
        body: EvaluationsRequest, ctx: VerifiedAgent, g: GatewayDep, request: Request
    ) -> Decision | Decisions:
        """AuthZEN Access Evaluations: many evaluations in one call, with default values
        and ``options.evaluations_semantic``; decided in one OpenFGA round."""
        admit(request, ctx)
        if body.subject is not None and not is_token_subject(ctx, body.subject):
            raise refusal_error(NOT_THE_SUBJECT)
        members = completed(body)
        if not body.evaluations:
            return (await answer(request, g, ctx, members))[0]
        semantic = body.options.evaluations_semantic if body.options else "execute_all"
        return Decisions(evaluations=await answer(request, g, ctx, members, semantic))

    @router.get(METADATA_PATH)
    async def authzen_configuration(request: Request, response: Response) -> Metadata:
        """AuthZEN Policy Decision Point metadata (no authentication needed)."""
        # Private: the document names the host it was asked under, so no shared cache
        # may hand one host's answer to another.
        response.headers["cache-control"] = "private, max-age=300"
        return metadata(str(request.base_url))

    app.include_router(router)
    app.add_middleware(AuthzenHeaders)
