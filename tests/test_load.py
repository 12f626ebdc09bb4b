"""The short CI version of ``bench/load.py``: concurrent agents against a real server.

A gateway process on uvicorn (loopback), the session's OpenFGA, two tenants of mixed
permissions, 8 concurrent agents for 20 seconds. Every answer is checked against the
exact oracle (no leak, no miss), every request has exactly one audit record (a 200's
record lists exactly the chunks returned), and the hash chain verifies. A request may
fail closed with a clean, audited 503 when OpenFGA is too slow for the machine's load
(CI boxes are shared); more than 5% of those fails the test.
"""

from __future__ import annotations

import pytest

from bench.load import run_load
from gateway.fga_server import ManagedOpenFGA


def _show(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture: the figures belong in the CI log."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


async def test_concurrent_agents_no_leak_every_request_audited(
    openfga: ManagedOpenFGA, request: pytest.FixtureRequest
) -> None:
    report = await run_load(
        openfga_url=openfga.url,
        duration_s=20.0,
        concurrency=8,
        documents=30,
        max_shed_fraction=0.05,
    )
    _show(request, f"load: {report.summary()}")
    assert report.requests >= 30, report.summary()
    assert report.leaks == 0, report.problems
    assert report.misses == 0, report.problems
    assert report.unexpected_errors == 0 and report.transport_errors == 0, report.problems
    assert report.audit_records == report.requests, report.summary()
    assert report.audit_mismatches == 0, report.summary()
    assert report.chain_ok
    assert report.exact_checked > 0  # the hash embeddings allow the exact top-k check
    assert report.ok(), report.summary()


@pytest.mark.soak
async def test_soak_minutes_of_load(
    openfga: ManagedOpenFGA, request: pytest.FixtureRequest
) -> None:
    report = await run_load(
        openfga_url=openfga.url,
        duration_s=180.0,
        concurrency=32,
        documents=120,
        max_shed_fraction=0.05,
    )
    _show(request, f"soak load: {report.summary()}")
    assert report.leaks == 0 and report.misses == 0, report.problems[:10]
    assert report.ok(), (report.summary(), report.problems[:10])
