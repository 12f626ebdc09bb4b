"""Prometheus metrics, one registry per app (tests run several apps per process).

They are served by their own small app (:func:`create_metrics_app`) on an operator
listener (``scopegate serve --metrics-port``, loopback by default), never by the
agent-facing API: per-tenant counts of denials are themselves a side channel.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.decision import DocumentVerdict

# Route labels: a request counts under the first prefix it starts with, else "other"
# (bounded label values whatever paths clients send).
_ROUTES = (
    "/v1/retrieve",
    "/v1/tasks",
    "/v1/sources",
    "/v1/relationships",
    "/v1/audit",
    "/v1/principals",
    "/v1/tenants",
    "/v1/token",
    "/access/v1",
    "/scim/v2",
    "/review",
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "scopegate_decisions",
            "Document decisions by outcome",
            ["tenant", "verdict"],
            registry=self.registry,
        )
        self.failed_checks = Counter(
            "scopegate_failed_checks",
            "Denials by the conjunct that failed",
            ["tenant", "check"],
            registry=self.registry,
        )
        self.errors = Counter(
            "scopegate_request_errors",
            "Requests that failed closed, by error code",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "scopegate_http_request_seconds",
            "HTTP request latency",
            ["route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def count_verdicts(self, tenant: str, verdicts: Iterable[DocumentVerdict]) -> None:
        for v in verdicts:
            self.decisions.labels(tenant, v.verdict).inc()
            for check in v.failed_checks:
                self.failed_checks.labels(tenant, check).inc()

    def count_error(self, tenant: str, code: str) -> None:
        self.errors.labels(tenant, code).inc()

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        route = next((r for r in _ROUTES if path.startswith(r)), "other")
        self.latency.labels(route, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_metrics_app(metrics: Metrics) -> Starlette:
    """The operator-facing ASGI app: ``GET /metrics`` in Prometheus' text format, nothing else.

    Give it the :class:`Metrics` of the API app (``create_app(metrics=...)`` or
    ``app.state.metrics``) so that it serves that app's counters.
    """

    async def scrape(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return Starlette(routes=[Route("/metrics", scrape, methods=["GET"])])
