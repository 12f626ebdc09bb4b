"""The reviewer page (gateway/static/, served by gateway/review.py) in a real browser.

A real uvicorn server runs on a free loopback port in a background thread, with its own
event loop and its own Gateway on the session's OpenFGA (``tests.served``, a
:class:`~gateway.background.BackgroundGateway`: a gateway's connections belong to the
loop that opened them). Debian's chromium, driven by Playwright for
Python, signs in with a reviewer token, opens a blocked retrieval, checks the verdict
table, replays it after a relationship change, replays it as of the decision (then / now,
the conjunct that flipped, the timeline of the change with a link to the admin record
that made it) and saves screenshots.

Chromium missing is a failure, never a skip: scripts/install-system-deps installs it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from gateway.background import BackgroundGateway
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.served import serve_gateway
from tests.world import World, bearer, doc

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Agents choose their queries: the page must show this as text and never run it.
HOSTILE_QUERY = (
    'revenue forecast <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
)


@dataclass
class Scene:
    reviewer_token: str
    admin_token: str
    blocked_id: str
    allowed_id: str


async def _scene(live_url: str, gateway: Gateway) -> Scene:
    """acme over the live server: one retrieval with blocked candidates, one without."""
    async with httpx.AsyncClient(base_url=live_url, trust_env=False, timeout=60) as http:
        w = await World(gateway, http, "acme").setup(
            members=["alice", "bob", "carol", "rita"], agents=["summarizer", "reader"]
        )
        await w.relationships(
            writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
        )
        # carol via the reader may read everything; alice via the summarizer only d1.
        everyone = ["agent:summarizer", "agent:reader"]
        await w.ingest(
            [
                doc("d1", "Revenue forecast: renewals up.", ["user:alice", "user:carol"], everyone),
                doc(
                    "d2",
                    "Revenue forecast: churn risk.",
                    ["user:alice", "user:carol"],
                    ["agent:reader"],
                ),
                doc("d3", "Revenue forecast: board pricing.", ["user:bob", "user:carol"], everyone),
            ]
        )
        carol = await w.task("carol", "reader", ["source:docs"])
        allowed = await w.retrieve("carol", "reader", carol, "renewals", k=10)
        alice = await w.task("alice", "summarizer", ["source:docs"])
        blocked = await w.retrieve("alice", "summarizer", alice, HOSTILE_QUERY, k=10)
        assert allowed.status_code == blocked.status_code == 200, blocked.text
        return Scene(
            reviewer_token=gateway.mint_token(tenant="acme", user="rita"),
            admin_token=w.admin_token,
            blocked_id=blocked.json()["request_id"],
            allowed_id=allowed.json()["request_id"],
        )


@pytest.fixture
def live(openfga: ManagedOpenFGA, embeddings: Any, tmp_path: Path) -> Iterator[BackgroundGateway]:
    # Post-filter: denied candidates are recorded (a pre-filter never sees them).
    bg = serve_gateway(
        openfga, tmp_path / "data", embeddings, strategy="postfilter", changelog_archive=True
    )
    with bg:
        yield bg


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _row(page: Page, table: str, document: str) -> Any:
    return page.locator(f'#{table} tr[data-document="{document}"]')


def test_reviewer_page_shows_blocked_record_and_replays_it(
    live: BackgroundGateway, tmp_path: Path
) -> None:
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: install Debian chromium (scripts/install-system-deps)"
    )
    assert live.url is not None
    url = live.url
    scene = live.call(_scene(url, live.gateway), timeout_s=180)
    expect.set_options(timeout=30_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.set_default_timeout(30_000)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"console: {msg.text}") if msg.type == "error" else None
                ),
            )
            page.on(
                "response",
                lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
            )
            outside: list[str] = []
            page.on(
                "request",
                lambda req: None if req.url.startswith(url) else outside.append(req.url),
            )

            page.goto(f"{url}/review")
            expect(page.locator("#auth")).to_be_visible()
            page.fill("#token", scene.reviewer_token)
            page.click("#save-token")
            expect(page.locator("#whoami")).to_have_text("signed in as rita @ acme")
            token = page.evaluate("sessionStorage.getItem('scopegate.reviewer.token')")
            assert token == scene.reviewer_token

            # Blocked retrievals only, by default: the fully allowed one is hidden.
            blocked_row = page.locator(f'#decision-rows tr[data-request-id="{scene.blocked_id}"]')
            expect(blocked_row).to_be_visible()
            expect(blocked_row).to_contain_text("partial")
            expect(page.locator(f'tr[data-request-id="{scene.allowed_id}"]')).to_have_count(0)

            blocked_row.click()
            expect(page.locator("#detail")).to_be_visible()
            expect(page.locator("#verdict-rows tr")).to_have_count(3)
            d1, d2, d3 = (_row(page, "verdict-rows", d) for d in ("d1", "d2", "d3"))
            expect(d1).to_contain_text("allow")
            expect(d2).to_contain_text("deny")
            expect(d2).to_contain_text("agent_can_read")
            expect(d2).to_contain_text(
                "agent:summarizer has no agent_viewer on document:d2 (directly, through a "
                "group, its folders or its source)"
            )
            expect(d3).to_contain_text("user_can_read")
            expect(d3).to_contain_text("user:alice has no viewer or owner on document:d3")
            expect(d2.locator("td").nth(1)).to_have_text("docs")

            # The agent-chosen query is shown as text and never runs.
            query = page.locator("#detail-meta dd").nth(6)
            expect(query).to_have_text(HOSTILE_QUERY)
            assert page.evaluate("window.__xss === undefined")
            assert page.locator("img").count() == 0

            # An admin grants the summarizer d2; the replay shows the was/now diff.
            grant = {
                "user": "agent:summarizer",
                "relation": "agent_viewer",
                "object": "document:d2",
            }
            response = httpx.post(
                f"{url}/v1/relationships",
                json={"writes": [grant]},
                headers=bearer(scene.admin_token),
                trust_env=False,
                timeout=60,
            )
            assert response.status_code == 200, response.text
            page.click("#replay")
            expect(page.locator("#replay-result")).to_be_visible()
            expect(page.locator("#diff-rows tr")).to_have_count(3)
            diff_d2 = _row(page, "diff-rows", "d2")
            expect(diff_d2).to_contain_text("now allowed")
            expect(diff_d2.locator("td").nth(1)).to_have_text("deny")
            expect(diff_d2.locator("td").nth(2)).to_have_text("allow")
            expect(_row(page, "diff-rows", "d3")).to_contain_text("still blocked")
            expect(_row(page, "diff-rows", "d3")).to_contain_text("user_can_read")
            expect(_row(page, "diff-rows", "d1")).to_contain_text("still allowed")
            expect(page.locator("#replay-summary")).to_contain_text("1 now allowed")

            # What-if from the page: nothing is written.
            page.click("#what-if summary")
            page.fill("#wi-user", "user:alice")
            page.select_option("#wi-relation", "viewer")
            page.fill("#wi-object", "document:d3")
            page.click("#wi-add")
            page.click("#replay-what-if")
            expect(page.locator("#replay-status")).to_contain_text("nothing was written")
            expect(_row(page, "diff-rows", "d3").locator(".what-if-col")).to_contain_text("allow")

            # As of the decision: d2 was and then denied, now allowed; the agent_can_read
            # conjunct flipped; the timeline shows the grant with its admin request.
            page.click("#replay-as-of")
            expect(page.locator("#asof-result")).to_be_visible()
            expect(page.locator("#asof-summary")).to_contain_text("matches the record")
            expect(page.locator("#asof-rows tr")).to_have_count(3)
            cells = _row(page, "asof-rows", "d2").locator("td")
            expect(cells.nth(1)).to_have_text("deny")  # was (recorded)
            expect(cells.nth(2)).to_have_text("deny")  # then (rebuilt)
            expect(cells.nth(3)).to_have_text("allow")  # now
            expect(cells.nth(4)).to_have_text("agent_can_read")
            expect(cells.nth(5)).to_have_text("1")
            d1_cells = _row(page, "asof-rows", "d1").locator("td")
            expect(d1_cells.nth(2)).to_have_text("allow")
            expect(d1_cells.nth(4)).to_have_text("\u2013")  # nothing flipped
            markers = page.locator("#timeline li.marker")
            expect(markers).to_have_count(2)
            expect(markers.first).to_contain_text("Decided")
            grant_entry = page.locator("#timeline li.write.flips")
            expect(grant_entry).to_have_count(1)
            expect(grant_entry).to_contain_text("wrote")
            expect(grant_entry).to_contain_text("agent:summarizer agent_viewer document:d2")
            expect(grant_entry).to_contain_text("agent_can_read")
            expect(grant_entry).to_contain_text("relationships.write, user:admin")
            link = grant_entry.locator("a.admin-link")
            admin_id = link.get_attribute("data-request-id")
            assert admin_id and admin_id == link.inner_text()

            shot = tmp_path / "review.png"
            page.screenshot(path=str(shot), full_page=True)
            timeline_shot = tmp_path / "timeline.png"
            page.locator("#asof-result").screenshot(path=str(timeline_shot))

            # The link opens the admin record that made the change; back returns.
            link.click()
            expect(page.locator("#detail-title")).to_have_text(f"Admin request {admin_id}")
            expect(page.locator("#admin-change-list")).to_contain_text(
                "write agent:summarizer agent_viewer document:d2"
            )
            expect(page.locator("#verdicts")).to_be_hidden()
            page.click("#back-to-decision")
            expect(page.locator("#detail-title")).to_have_text(f"Decision {scene.blocked_id}")
            assert problems == [], problems
            assert outside == [], f"the page reached outside the gateway: {outside}"
        finally:
            browser.close()

    data = shot.read_bytes()
    width, height = _png_size(data)
    assert width >= 1000 and height >= 600 and len(data) > 20_000
    timeline = timeline_shot.read_bytes()
    width, height = _png_size(timeline)
    assert width >= 900 and height >= 250 and len(timeline) > 10_000
