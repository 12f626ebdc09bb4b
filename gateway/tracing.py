"""OpenTelemetry traces (DESIGN section 9): one span per phase, W3C ``traceparent`` in and out.

Off by default. Until a tracer is installed, by :func:`configure_from_env` (standard
``OTEL_*`` variables) or :func:`enable` (an application's own ``TracerProvider``, or a
test's), every helper here costs one module-global read: :func:`span` hands back a
shared null context, :func:`headers` an empty dict, and :class:`TraceContextMiddleware`
passes requests straight through. No OpenTelemetry object is created on the request
path while tracing is off.

Once on, the tree of one retrieval over HTTP is::

    POST /v1/retrieve            server span; parent: the agent's ``traceparent``, if any
    ├── scopegate.verify         the delegation token
    └── scopegate.retrieve       request id, strategy, k, candidates, outcome, rounds
        ├── scopegate.embed
        ├── scopegate.search     one per window (refills add more)
        ├── scopegate.check      one per BatchCheck round: checks, documents, round
        │   └── openfga.BatchCheck   one per call of at most 50 checks (client span);
        │                            OpenFGA receives its ``traceparent``
        ├── scopegate.pack
        └── scopegate.audit

An AuthZEN evaluation has ``scopegate.evaluate`` in place of ``scopegate.retrieve``
(no embed, search or pack). Spans carry counts and the request id (the key to the
audit record), never user, agent, document ids or query text: traces leave the
gateway for a collector, and what was denied stays in the audit log.

Tracing has its own tracer provider and does not install it globally: libraries that
trace on their own (the vector store's client) keep whatever their configuration says.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from typing import Any, Final, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("scopegate.tracing")

TRACER_NAME = "scopegate"
DEFAULT_SERVICE_NAME = "scopegate"
#: The W3C Trace Context headers, as ASGI spells them.
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_OFF: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Tracer | None = None
#: The kind of spans around calls to other services (OpenFGA).
CLIENT: Final = SpanKind.CLIENT

P = ParamSpec("P")
R = TypeVar("R")
Attributes = Mapping[str, AttributeValue]


# -- switching on and off -------------------------------------------------------------------


def enabled() -> bool:
    return _tracer is not None


def enable(provider: trace.TracerProvider) -> None:
    """Trace into ``provider`` from now on (an application's own, or a test's)."""
    global _tracer
    _tracer = provider.get_tracer(TRACER_NAME)


def disable() -> None:
    """Back to no tracing at all; the provider is left to its owner to shut down."""
    global _tracer
    _tracer = None


def configure_from_env() -> TracerProvider | None:
    """Turn tracing on when the standard ``OTEL_*`` variables ask for it.

    On only when asked explicitly: ``OTEL_TRACES_EXPORTER`` names an exporter
    (``otlp``, ``console``; ``none`` keeps it off), or an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, which
    implies ``otlp``). ``OTEL_SDK_DISABLED=true`` wins over both. The SDK reads the
    rest itself: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (service name
    ``scopegate`` unless set), ``OTEL_TRACES_SAMPLER`` (default: follow the caller's
    sampled flag, sample new traces), ``OTEL_BSP_*`` and the exporter's own variables.
    Returns the provider it installed, or None (also when tracing was already on).
    """
    if enabled() or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = [_exporter(name) for name in _exporter_names()]
    if not exporters:
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    enable(provider)
    return provider


def _exporter_names() -> list[str]:
    listed = os.environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in listed.split(",") if n.strip()]
    if not names and (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def _exporter(name: str) -> SpanExporter:
    """The exporter ``OTEL_TRACES_EXPORTER`` names; unknown names are a startup error."""
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: scopegate supports otlp and console")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[no-redef]
                OTLPSpanExporter,
            )
        else:
            raise ValueError(f"OTLP protocol {protocol!r}: use grpc or http/protobuf")
    except ImportError as exc:
        raise ValueError(
            f"the OTLP {protocol} exporter is not installed ({exc.name}): install "
            "opentelemetry-exporter-otlp, or choose OTEL_TRACES_EXPORTER=console"
        ) from exc
    exporter: SpanExporter = OTLPSpanExporter()
    return exporter


# -- spans ------------------------------------------------------------------------------------


def span(
    name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL
) -> AbstractContextManager[Span | None]:
    """A child of the current span for the ``with`` block (a null context when off).

    An exception leaving the block is recorded on the span, which is marked as an error.
    """
    tracer = _tracer
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def traced(
    name: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Run an async function inside a span of its own (directly when tracing is off)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            tracer = _tracer
            if tracer is None:
                return await fn(*args, **kwargs)
            with tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return run

    return decorate


def annotate(attributes: Attributes) -> None:
    """Set attributes on the current span (nothing when off or outside any span)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


def headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, for an outgoing call.

    Empty when tracing is off or no span is current: nothing is sent then.
    """
    if _tracer is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


# -- the HTTP edge ------------------------------------------------------------------------------


class TraceContextMiddleware:
    """One server span per HTTP request, continuing the caller's W3C trace context.

    A valid ``traceparent`` from the agent makes the request's span its child (same
    trace id; its sampled flag is honoured by the default sampler); an invalid one is
    ignored and a new trace starts. The span is named ``METHOD /route/{template}`` once
    routing has matched, so names stay few whatever the ids in paths.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _TRACE_HEADERS
        }
        method = str(scope.get("method", "HTTP"))
        with tracer.start_as_current_span(
            method,
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            # No url.path: paths carry ids (documents, principals); the route template
            # is set below once routing has matched.
            attributes={"http.request.method": method},
        ) as server_span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    server_span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        server_span.set_status(StatusCode.ERROR)
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    server_span.update_name(f"{method} {route}")
                    server_span.set_attribute("http.route", route)
