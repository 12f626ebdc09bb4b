"""The scaled-out shape (DESIGN §8) on real engines, and the deployment files that mirror it.

The cluster tests run against ``scripts/cluster`` (tests/cluster.py): PostgreSQL, two
OpenFGA processes on it, a Chroma server, three gateway replicas in production mode and
HAProxy in front. The tenant is built through replica 1 only; everything else is asked
of the other replicas and of the load balancer. Beyond revocations and an OpenFGA
process killed under traffic: ingestions racing through two replicas for one name, a
source recycled through one replica, the leak oracle (tests/oracle_model.py) written
and read through HAProxy (``SCOPEGATE_ORACLE_SEED`` replays a world,
``SCOPEGATE_CLUSTER_ORACLE_WORLDS`` runs more), and, last, a replica SIGKILLed under
load without an audit record lost.

The deployment tests parse ``deploy/compose.yaml``, ``deploy/haproxy.cfg`` and
``deploy/kubernetes/*.yaml`` and compare their settings with the layout the cluster
script prints (``scripts/cluster plan``), so that the files users deploy keep the shape
that is tested here.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.cluster import REPO, RunningCluster, cluster_fixture, plan_of, run_script
from tests.oracle_model import (
    ADMIN,
    DOC_POOL,
    FOLDER_POOL,
    SOURCE_POOL,
    Call,
    Chunk,
    Step,
    Task,
    TenantState,
)
from tests.oracle_model import plan as plan_step
from tests.test_leak_oracle import compare
from tests.world import doc

DEPLOY = REPO / "deploy"
__all__ = ["cluster_fixture"]  # the `cluster` fixture, for the tests of this module

# -- the deployment files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The layout of a cluster that was never started (default ports)."""
    return plan_of(tmp_path_factory.mktemp("plan") / "state")


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a mapping (every flag must carry its value)."""
    flags = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"{arg!r} is not --flag=value"
        name, value = arg.split("=", 1)
        flags[name] = value
    return flags


def _interpolated(environment: dict[str, Any]) -> dict[str, str]:
    """Compose's ``${VAR:?message}`` references replaced by a stand-in value."""
    return {name: re.sub(r"\$\{[^}]*\}", "set-in-env", str(v)) for name, v in environment.items()}


def _sections(config: str) -> dict[str, list[str]]:
    """An HAProxy configuration as {section header: its directives}, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in config.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if raw[:1] in (" ", "\t"):
            sections[current].append(" ".join(line.split()))
        else:
            current = line.strip()
            sections[current] = []
    return sections


def _check_words(plan: dict[str, Any]) -> str:
    check = plan["haproxy"]["check"]
    return f"check inter {check['inter']} fall {check['fall']} rise {check['rise']}"


def test_plan_is_the_scaled_out_shape(plan: dict[str, Any]) -> None:
    assert plan["gateway"]["replicas"] == 3
    assert plan["openfga"]["replicas"] == 2
    assert plan["gateway"]["ready_path"] == "/readyz"
    env = plan["gateway"]["env"]
    assert env["SCOPEGATE_ENVIRONMENT"] == "production"
    assert env["SCOPEGATE_AUDIT_DSN"].startswith("postgresql://")
    assert env["SCOPEGATE_CATALOG_DSN"] == env["SCOPEGATE_AUDIT_DSN"]
    assert env["SCOPEGATE_OPENFGA_URL"] == plan["haproxy"]["openfga_url"]
    assert plan["openfga"]["flags"]["--datastore-engine"] == "postgres"
    # The gateway treats a full ListObjects answer as truncated: both limits are one.
    assert (
        env["SCOPEGATE_LISTOBJECTS_MAX_RESULTS"]
        == plan["openfga"]["flags"]["--listObjects-max-results"]
    )
    ports = [plan["postgres"]["port"], plan["chroma"]["port"]]
    ports += [plan["haproxy"]["gateway_port"], plan["haproxy"]["openfga_port"]]
    ports += [p[k] for p in plan["openfga"]["processes"] for k in ("http_port", "grpc_port")]
    ports += [p[k] for p in plan["gateway"]["processes"] for k in ("port", "metrics_port")]
    assert len(set(ports)) == len(ports)


def test_compose_mirrors_the_cluster(plan: dict[str, Any]) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway, openfga = services["gateway"], services["openfga"]
    assert gateway["deploy"]["replicas"] == plan["gateway"]["replicas"]
    assert openfga["deploy"]["replicas"] == plan["openfga"]["replicas"]

    # The store and model ids are written once by the bootstrap service and read by
    # every replica; everything else is in the gateway's environment.
    bootstrap = services["openfga-bootstrap"]["command"]
    assert "openfga-bootstrap" in bootstrap
    ids_file = bootstrap[bootstrap.index("--output") + 1]
    assert f". {ids_file}" in " ".join(gateway["command"])
    assert services["openfga-bootstrap"]["depends_on"]["openfga"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["openfga-bootstrap"]["condition"] == (
        "service_completed_successfully"
    )
    env = _interpolated(gateway["environment"])
    names = set(env) | {"SCOPEGATE_OPENFGA_STORE_ID", "SCOPEGATE_OPENFGA_MODEL_ID"}
    assert names == set(plan["gateway"]["env"])
    for name, value in plan["gateway"]["pinned_env"].items():
        assert env[name] == value, name
    _same_endpoints(env, plan)
    openfga_url = urllib.parse.urlsplit(env["SCOPEGATE_OPENFGA_URL"])
    assert openfga_url.hostname == "haproxy"
    haproxy = _sections((DEPLOY / "haproxy.cfg").read_text())
    assert f"bind :{openfga_url.port}" in haproxy["frontend openfga"]
    assert "gateway:8080" in " ".join(haproxy["backend gateways"])
    assert "bind :8080" in haproxy["frontend gateway"]

    assert plan["gateway"]["ready_path"] in " ".join(gateway["healthcheck"]["test"])
    chroma = services["chroma"]
    assert plan["chroma"]["health_path"] in " ".join(chroma["healthcheck"]["test"])
    assert env["SCOPEGATE_CHROMA_URL"] == "http://chroma:8000"
    assert chroma["command"][0] == "run" and "8000" in chroma["command"]

    assert openfga["command"][0] == "run"
    assert _flags(openfga["command"][1:]) == plan["openfga"]["flags"]
    migrate = services["openfga-migrate"]
    assert migrate["command"][0] == "migrate"
    assert _flags(migrate["command"][1:]) == {"--datastore-engine": "postgres"}
    assert openfga["depends_on"]["openfga-migrate"]["condition"] == (
        "service_completed_successfully"
    )
    for service in (migrate, openfga):
        datastore = _interpolated(service["environment"])["OPENFGA_DATASTORE_URI"]
        uri = urllib.parse.urlsplit(datastore)
        assert (uri.scheme, uri.path) == ("postgres", "/openfga")
    # The key OpenFGA accepts is the one the gateways present.
    preshared = openfga["environment"]["OPENFGA_AUTHN_PRESHARED_KEYS"]
    assert preshared == gateway["environment"]["SCOPEGATE_OPENFGA_API_TOKEN"]


def _same_endpoints(env: dict[str, str], plan: dict[str, Any]) -> None:
    """Endpoints differ per deployment, but point at the same kind of thing."""
    ours = plan["gateway"]["env"]
    for name in ("SCOPEGATE_AUDIT_DSN", "SCOPEGATE_CATALOG_DSN"):
        theirs, mine = urllib.parse.urlsplit(env[name]), urllib.parse.urlsplit(ours[name])
        assert (theirs.scheme, theirs.path) == (mine.scheme, mine.path), name
    assert (env["SCOPEGATE_AUDIT_DSN"] == env["SCOPEGATE_CATALOG_DSN"]) == (
        ours["SCOPEGATE_AUDIT_DSN"] == ours["SCOPEGATE_CATALOG_DSN"]
    )
    for name in ("SCOPEGATE_OPENFGA_URL", "SCOPEGATE_CHROMA_URL"):
        assert urllib.parse.urlsplit(env[name]).scheme in ("http", "https"), name


def test_compose_haproxy_mirrors_the_cluster(plan: dict[str, Any], tmp_path: Path) -> None:
    ours = _sections(run_script("--state-dir", str(tmp_path / "state"), "haproxy-config").stdout)
    theirs = _sections((DEPLOY / "haproxy.cfg").read_text())

    def settings(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith(("server", "bind "))]

    for section in (
        "defaults",
        "frontend gateway",
        "backend gateways",
        "frontend openfga",
        "backend openfga",
    ):
        assert settings(theirs[section]) == settings(ours[section]), section
    assert f"option httpchk GET {plan['gateway']['ready_path']}" in ours["backend gateways"]
    assert f"option httpchk GET {plan['openfga']['health_path']}" in ours["backend openfga"]
    check = _check_words(plan)
    for backend, replicas in (
        ("backend gateways", plan["gateway"]["replicas"]),
        ("backend openfga", plan["openfga"]["replicas"]),
    ):
        servers = [line for line in ours[backend] if line.startswith("server ")]
        assert len(servers) == replicas and all(check in line for line in servers)
        (template,) = [line for line in theirs[backend] if line.startswith("server-template ")]
        assert int(template.split()[2]) == replicas and check in template


def _kubernetes() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                key = (document["kind"], document["metadata"]["name"])
                assert key not in objects, f"{key} defined twice"
                objects[key] = document
    return objects


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_kubernetes_mirrors_the_cluster(plan: dict[str, Any]) -> None:
    objects = _kubernetes()
    check = plan["haproxy"]["check"]

    gateway = objects[("Deployment", "scopegate")]
    assert gateway["spec"]["replicas"] == plan["gateway"]["replicas"]
    container = _container(gateway)
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == plan["gateway"]["ready_path"]
    assert live["httpGet"]["path"] == plan["gateway"]["live_path"]
    # The Service drops a replica as HAProxy does: same interval, fall and rise.
    assert (f"{ready['periodSeconds']}s", ready["failureThreshold"], ready["successThreshold"]) == (
        check["inter"],
        check["fall"],
        check["rise"],
    )
    config = objects[("ConfigMap", "scopegate-config")]["data"]
    secret = objects[("Secret", "scopegate-secrets")]["stringData"]
    sources = [
        e.get("configMapRef", e.get("secretRef", {})).get("name") for e in container["envFrom"]
    ]
    assert sources == ["scopegate-config", "scopegate-secrets"]
    names = set(config) | set(secret) | {e["name"] for e in container.get("env", [])}
    wanted = set(plan["gateway"]["env"])
    assert wanted <= names, wanted - names
    assert names - wanted <= set(plan["gateway"]["optional_env"]), names - wanted
    assert not set(config) & set(secret)
    for name, value in plan["gateway"]["pinned_env"].items():
        assert config[name] == value, name
    _same_endpoints({**config, **secret}, plan)
    service = objects[("Service", "scopegate")]
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]

    openfga = objects[("Deployment", "openfga")]
    assert openfga["spec"]["replicas"] == plan["openfga"]["replicas"]
    container = _container(openfga)
    assert container["args"][0] == "run"
    assert _flags(container["args"][1:]) == plan["openfga"]["flags"]
    assert container["readinessProbe"]["httpGet"]["path"] == plan["openfga"]["health_path"]
    assert config["SCOPEGATE_OPENFGA_URL"] == "http://openfga:8080"
    migrate = _container(objects[("Job", "openfga-migrate")])
    assert migrate["args"][0] == "migrate"
    assert _flags(migrate["args"][1:]) == {"--datastore-engine": "postgres"}
    openfga_secret = objects[("Secret", "openfga-secrets")]["stringData"]
    uri = urllib.parse.urlsplit(openfga_secret["OPENFGA_DATASTORE_URI"])
    assert (uri.scheme, uri.path) == ("postgres", "/openfga")
    assert openfga_secret["OPENFGA_AUTHN_PRESHARED_KEYS"] == secret["SCOPEGATE_OPENFGA_API_TOKEN"]
    bootstrap = _container(objects[("Job", "scopegate-openfga-bootstrap")])
    assert "openfga-bootstrap" in bootstrap["args"]

    chroma = _container(objects[("StatefulSet", "chroma")])
    assert chroma["readinessProbe"]["httpGet"]["path"] == plan["chroma"]["health_path"]
    assert config["SCOPEGATE_CHROMA_URL"] == "http://chroma:8000"
    init = objects[("ConfigMap", "postgres-init")]["data"]
    for database in plan["postgres"]["databases"]:
        assert f"CREATE DATABASE {database} OWNER {database};" in "".join(init.values())


# -- the running cluster -------------------------------------------------------------------

TENANT = "acme"
AGENT = "summarizer"
QUERY = "revenue forecast and incidents"
CORPUS = [
    doc("rev1", "Quarterly revenue forecast: revenue grows eight percent on renewals.",
        viewers=["user:alice", "user:bob"], agents=[f"agent:{AGENT}"]),
    doc("rev2", "Revenue by region: EMEA revenue doubled while APAC revenue stayed flat.",
        viewers=["user:alice", "user:bob"], agents=[f"agent:{AGENT}"]),
    doc("rev3", "Revenue recognition policy: multi-year contract revenue is deferred.",
        viewers=["group:finance#member"], agents=[f"agent:{AGENT}"]),
    doc("inc1", "Incident postmortem: the primary database failed over after disk saturation.",
        viewers=["user:alice"], agents=[f"agent:{AGENT}"]),
    doc("pay1", "Confidential salary bands: staff engineers earn 212k; revenue bonus is 9%.",
        viewers=["user:bob"], agents=[f"agent:{AGENT}"]),
]  # fmt: skip
ALICE_DOCS = {"rev1", "rev2", "rev3", "inc1"}
BOB_DOCS = {"rev1", "rev2", "rev3", "pay1"}


@dataclass
class Acme:
    """Tenant ``acme``, built through replica 1: alice and bob delegate to the summarizer."""

    cluster: RunningCluster
    tasks: dict[str, str] = field(default_factory=dict)

    def as_user(self, url: str, user: str) -> httpx.Client:
        return self.cluster.client(url, self.cluster.token(tenant=TENANT, user=user))

    def retrieve(self, url: str, user: str) -> httpx.Response:
        token = self.cluster.token(tenant=TENANT, user=user, agent=AGENT, task=self.tasks[user])
        with self.cluster.client(url, token) as agent:
            return agent.post("/v1/retrieve", json={"query": QUERY, "k": 10})

    def documents(self, url: str, user: str) -> set[str]:
        response = self.retrieve(url, user)
        assert response.status_code == 200, (url, response.text)
        return {chunk["document_id"] for chunk in response.json()["chunks"]}


def _expect(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.text)
    body: dict[str, Any] = response.json() if response.content else {}
    return body


@pytest.fixture(scope="module")
def acme(cluster: RunningCluster) -> Iterator[Acme]:
    acme = Acme(cluster)
    first = cluster.replica_urls[0]
    operator = cluster.token(tenant="platform", user="ops", operator=True)
    with cluster.client(first, operator) as ops:
        _expect(ops.post("/v1/tenants", json={"id": TENANT, "admin": "admin"}), 201)
    member = [("user:alice", "member"), ("user:bob", "member"), (f"agent:{AGENT}", "member")]
    writes = [{"user": u, "relation": r, "object": f"tenant:{TENANT}"} for u, r in member]
    writes += [
        {"user": f"user:{u}", "relation": "member", "object": "group:finance"}
        for u in ("alice", "bob")
    ]
    with acme.as_user(first, "admin") as admin:
        _expect(admin.post("/v1/relationships", json={"writes": writes}), 200)
        source = {"id": "docs", "kind": "chroma", "config": {"url": cluster.plan["chroma"]["url"]}}
        _expect(admin.post("/v1/sources", json=source), 201)
        _expect(admin.post("/v1/sources/docs/documents", json={"documents": CORPUS}), 200)
        for user in ("alice", "bob"):
            task = {"user": f"user:{user}", "agent": f"agent:{AGENT}", "scope": ["source:docs"]}
            acme.tasks[user] = _expect(admin.post("/v1/tasks", json=task), 201)["task_id"]
    yield acme


def test_cluster_status_shows_every_part(cluster: RunningCluster) -> None:
    # Started on free ports with its state in a fresh directory, within the time budget.
    assert cluster.up_seconds < 60, cluster.up_seconds
    status = cluster.status()
    parts = ["postgres", "openfga-1", "openfga-2", "chroma", "haproxy"]
    parts += [f"gateway-{i}" for i in (1, 2, 3)]
    assert sorted(status) == sorted(parts)
    for part in parts:
        row = status[part]
        assert row["state"] == "up" and row["pid"], row
    for part in ("openfga-1", "openfga-2", "gateway-1", "gateway-2", "gateway-3"):
        assert "haproxy UP" in status[part]["health"], status[part]
    for replica in [*cluster.replica_urls, cluster.lb_url]:
        ready = httpx.get(f"{replica}/readyz", timeout=10, trust_env=False)
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
        # Every replica decides with the one pinned store and model.
        assert ready.json()["store_id"] == cluster.plan["store"]["store_id"]
        assert ready.json()["model_id"] == cluster.plan["store"]["model_id"]


def test_source_and_documents_from_one_replica_are_served_by_the_others(acme: Acme) -> None:
    cluster = acme.cluster
    for url in cluster.replica_urls[1:]:
        with acme.as_user(url, "admin") as admin:
            shown = _expect(admin.get("/v1/sources/docs"), 200)
        assert shown["documents"] == len(CORPUS), (url, shown)
    for url in [*cluster.replica_urls[1:], cluster.lb_url, cluster.lb_url, cluster.lb_url]:
        assert acme.documents(url, "alice") == ALICE_DOCS, url
        assert acme.documents(url, "bob") == BOB_DOCS, url


def test_admin_rights_revoked_through_one_replica_deny_on_the_others(acme: Acme) -> None:
    cluster = acme.cluster
    first, others = cluster.replica_urls[0], cluster.replica_urls[1:]
    grant = {"user": "user:carol", "relation": "admin", "object": f"tenant:{TENANT}"}
    membership = {"user": "user:carol", "relation": "member", "object": f"tenant:{TENANT}"}
    with acme.as_user(first, "admin") as admin:
        _expect(admin.post("/v1/relationships", json={"writes": [membership, grant]}), 200)
    for url in others:
        with acme.as_user(url, "carol") as carol:
            _expect(carol.get("/v1/relationships", params={"object": "group:finance"}), 200)
    with acme.as_user(first, "admin") as admin:
        _expect(admin.post("/v1/relationships", json={"deletes": [grant]}), 200)
    # The very next request on every other replica is denied: no replica caches a grant.
    for url in others:
        with acme.as_user(url, "carol") as carol:
            _expect(carol.get("/v1/relationships", params={"object": "group:finance"}), 403)


def test_document_grant_revoked_through_one_replica_denies_on_the_others(acme: Acme) -> None:
    cluster = acme.cluster
    first, others = cluster.replica_urls[0], cluster.replica_urls[1:]
    grant = {"user": "user:alice", "relation": "viewer", "object": "document:inc1"}
    for url in others:
        assert "inc1" in acme.documents(url, "alice"), url
    with acme.as_user(first, "admin") as admin:
        _expect(admin.post("/v1/relationships", json={"deletes": [grant]}), 200)
    try:
        for url in others:
            assert acme.documents(url, "alice") == ALICE_DOCS - {"inc1"}, url
            assert acme.documents(url, "bob") == BOB_DOCS, url
    finally:
        with acme.as_user(first, "admin") as admin:
            _expect(admin.post("/v1/relationships", json={"writes": [grant]}), 200)


def _rerouted(cluster: RunningCluster, server: str) -> int:
    """Requests HAProxy failed to pass to ``server`` and sent elsewhere (or retried)."""
    stats = cluster.haproxy_stats("openfga")[server]
    return sum(int(stats[k] or 0) for k in ("wredis", "wretr", "econ", "eresp"))


@dataclass
class Killed:
    name: str
    rerouted_before: int


@pytest.fixture
def one_openfga_killed(cluster: RunningCluster) -> Iterator[Killed]:
    """OpenFGA process 1 SIGKILLed; brought back (``scripts/cluster up``) afterwards."""
    victim = cluster.plan["openfga"]["processes"][0]["name"]
    killed = Killed(victim, _rerouted(cluster, victim))
    cluster.kill(victim)
    try:
        yield killed
    finally:
        cluster.up()
        assert "haproxy UP" in cluster.wait_status(victim, "haproxy UP")["health"]


def test_one_openfga_killed_admin_decisions_keep_being_answered(
    acme: Acme, one_openfga_killed: Killed
) -> None:
    cluster = acme.cluster
    started = time.monotonic()
    # Right after the kill (HAProxy has not noticed yet) and after it marked it down.
    while time.monotonic() - started < 4:
        with acme.as_user(cluster.lb_url, "admin") as admin:
            _expect(admin.get("/v1/relationships", params={"object": "group:finance"}), 200)
        # A user who is not an admin is still refused: nothing fails open.
        with acme.as_user(cluster.lb_url, "alice") as alice:
            _expect(alice.get("/v1/relationships", params={"object": "group:finance"}), 403)
    # The requests did reach the dead process and were sent to the other one.
    assert _rerouted(cluster, one_openfga_killed.name) > one_openfga_killed.rerouted_before
    row = cluster.wait_status(one_openfga_killed.name, "haproxy DOWN")
    assert row["state"] == "down" and "haproxy DOWN" in row["health"], row


def test_one_openfga_killed_retrievals_keep_being_answered(
    acme: Acme, one_openfga_killed: Killed
) -> None:
    cluster = acme.cluster
    started = time.monotonic()
    while time.monotonic() - started < 4:
        # Complete answers, and never a document the user may not read.
        assert acme.documents(cluster.lb_url, "alice") == ALICE_DOCS
        assert acme.documents(cluster.lb_url, "bob") == BOB_DOCS
    assert _rerouted(cluster, one_openfga_killed.name) > one_openfga_killed.rerouted_before


# -- two replicas racing for one name --------------------------------------------------------

RIVAL_READERS = ("alice", "bob")  # who may read what the first and the second source write
RIVAL_QUERY = "contested launch memo"


@dataclass
class Rivals:
    """Two sources of ``acme`` (registered through replica 1) and tasks over both."""

    acme: Acme
    sources: tuple[str, str]
    tasks: dict[str, str]  # user -> a task scoped to both sources

    @classmethod
    def register(cls, acme: Acme, name: str) -> Rivals:
        rivals = cls(acme, (f"{name}-a", f"{name}-b"), {})
        with acme.as_user(acme.cluster.replica_urls[0], "admin") as admin:
            for source in rivals.sources:
                _expect(admin.post("/v1/sources", json={"id": source, "kind": "chroma"}), 201)
            rivals.new_tasks(admin)
        return rivals

    def new_tasks(self, admin: httpx.Client) -> None:
        for user in RIVAL_READERS:
            scope = [f"source:{s}" for s in self.sources]
            task = {"user": f"user:{user}", "agent": f"agent:{AGENT}", "scope": scope}
            self.tasks[user] = _expect(admin.post("/v1/tasks", json=task), 201)["task_id"]

    def reader(self, source: str) -> str:
        return RIVAL_READERS[self.sources.index(source)]

    def document(self, source: str, doc_id: str, folder: str | None) -> dict[str, Any]:
        text = f"Contested launch memo written by {source}: the launch of {doc_id} moves."
        viewers = [f"user:{self.reader(source)}"]
        return doc(doc_id, text, viewers=viewers, agents=[f"agent:{AGENT}"], folder=folder)

    def chunks(self, url: str, user: str) -> list[dict[str, Any]]:
        """What the user's agent retrieves from the two sources through ``url``."""
        cluster = self.acme.cluster
        token = cluster.token(tenant=TENANT, user=user, agent=AGENT, task=self.tasks[user])
        with cluster.client(url, token) as agent:
            response = agent.post("/v1/retrieve", json={"query": RIVAL_QUERY, "k": 20})
        chunks: list[dict[str, Any]] = _expect(response, 200)["chunks"]
        return chunks


def _at_once(requests: list[tuple[httpx.Client, str, dict[str, Any]]]) -> list[httpx.Response]:
    """POST every (client, path, body) at the same moment, one thread each."""
    barrier = threading.Barrier(len(requests))

    def send(request: tuple[httpx.Client, str, dict[str, Any]]) -> httpx.Response:
        client, path, body = request
        client.get("/healthz")  # the connection is open before the race starts
        barrier.wait()
        return client.post(path, json=body)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def _public_tuples(acme: Acme, url: str, obj: str) -> set[tuple[str, str, str]]:
    with acme.as_user(url, "admin") as admin:
        listed = _expect(admin.get("/v1/relationships", params={"object": obj}), 200)
    return {(r["user"], r["relation"], r["object"]) for r in listed["relationships"]}


@pytest.mark.parametrize("contested", ["document", "folder"])
def test_concurrent_ingests_through_two_replicas_cannot_both_win(
    acme: Acme, contested: str
) -> None:
    """Two sources claim one document id (or one folder) through two replicas at once."""
    cluster = acme.cluster
    rivals = Rivals.register(acme, f"race-{contested}")
    replicas = cluster.replica_urls
    if contested == "document":
        batches = {s: rivals.document(s, "contested", None) for s in rivals.sources}
    else:
        batches = {s: rivals.document(s, f"filed-{s}", "shared") for s in rivals.sources}
    with acme.as_user(replicas[0], "admin") as one, acme.as_user(replicas[1], "admin") as two:
        answers = _at_once(
            [
                (client, f"/v1/sources/{source}/documents", {"documents": [batches[source]]})
                for client, source in zip((one, two), rivals.sources, strict=True)
            ]
        )
    statuses = [a.status_code for a in answers]
    assert sorted(statuses) == [200, 409], [a.text for a in answers]
    assert answers[statuses.index(409)].json()["error"]["code"] == "conflict"
    winner, loser = rivals.sources if statuses[0] == 200 else reversed(rivals.sources)
    won, lost = batches[winner], batches[loser]
    reader, other = rivals.reader(winner), rivals.reader(loser)

    # The catalog, the tuples and the vector store hold the winner's batch only, seen
    # from the third replica and through the load balancer.
    third = replicas[2]
    with acme.as_user(third, "admin") as admin:
        assert _expect(admin.get(f"/v1/sources/{winner}"), 200)["documents"] == 1
        assert _expect(admin.get(f"/v1/sources/{loser}"), 200)["documents"] == 0
    parent = f"folder:{won['folder']}" if won.get("folder") else f"source:{winner}"
    assert _public_tuples(acme, third, f"document:{won['id']}") == {
        (f"user:{reader}", "viewer", f"document:{won['id']}"),
        (f"agent:{AGENT}", "agent_viewer", f"document:{won['id']}"),
        (parent, "parent", f"document:{won['id']}"),
    }
    if contested == "folder":
        assert _public_tuples(acme, third, "folder:shared") == {
            (f"source:{winner}", "parent", "folder:shared")
        }
        assert _public_tuples(acme, third, f"document:{lost['id']}") == set()
    for url in (third, cluster.lb_url, cluster.lb_url):
        chunks = rivals.chunks(url, reader)
        assert [(c["document_id"], c["source"], c["text"]) for c in chunks] == [
            (won["id"], winner, won["text"])
        ], url
        assert rivals.chunks(url, other) == [], url


def test_source_removed_and_registered_again_through_one_replica_is_served_by_the_others(
    acme: Acme,
) -> None:
    """The other replicas hold handles to the source's old Chroma collections: the new
    ones are found by name, on their very first request."""
    cluster = acme.cluster
    first, others = cluster.replica_urls[0], cluster.replica_urls[1:]
    rivals = Rivals.register(acme, "recycled")
    source = rivals.sources[0]
    reader = rivals.reader(source)
    for text in ("first", "second"):
        memo = rivals.document(source, f"memo-{text}", None)
        with acme.as_user(first, "admin") as admin:
            if text == "second":
                _expect(admin.delete(f"/v1/sources/{source}"), 204)
                _expect(admin.post("/v1/sources", json={"id": source, "kind": "chroma"}), 201)
                rivals.new_tasks(admin)  # the removal took the old tasks' scope away
            _expect(admin.post(f"/v1/sources/{source}/documents", json={"documents": [memo]}), 200)
        for url in others:  # each replica opens (and keeps) the source's collections
            chunks = rivals.chunks(url, reader)
            assert [(c["document_id"], c["text"]) for c in chunks] == [
                (memo["id"], memo["text"])
            ], url
    # A write through another replica after the recycling works on the new collections too.
    again = rivals.document(source, "memo-second", None)
    again["text"] += " Again."
    with acme.as_user(others[0], "admin") as admin:
        _expect(admin.post(f"/v1/sources/{source}/documents", json={"documents": [again]}), 200)


# -- the leak oracle through the load balancer ---------------------------------------------

# Mutations of tests/oracle_model.py applied through the load balancer (the faulted
# ones need a fault proxy in front of OpenFGA, which this cluster does not have); "race"
# sends its two rival ingestions through two different replicas at once.
LB_MUTATIONS = (
    "collide", "reparent", "narrow", "widen", "same", "move", "nest", "deprovision",
    "readd", "remove_source", "add_source", "new_task", "revoke_task", "revoke_grant",
    "add_grant", "leave_group", "delete_document", "race",
)  # fmt: skip
LB_WORLDS = 1  # of two tenants; SCOPEGATE_CLUSTER_ORACLE_WORLDS asks for more
LB_STEPS = 5  # mutations per tenant and world


def _random_tenant(name: str, rng: random.Random) -> TenantState:
    """A tenant drawn like the leak oracle's (tests/test_leak_oracle.py), from ``rng``."""
    users = tuple(f"u{i}" for i in range(rng.randint(2, 4)))
    agents = tuple(f"a{i}" for i in range(rng.randint(1, 3)))
    groups = tuple(f"g{i}" for i in range(rng.randint(1, 3)))
    sources = rng.sample(SOURCE_POOL, rng.randint(2, 3))
    # Opener than the leak oracle's worlds: most answers here have something to compare.
    state = TenantState(name, users, agents, groups, rng.choice((0.7, 0.8, 0.9)), sources)
    user_refs = [f"user:{u}" for u in users]
    agent_refs = [f"agent:{a}" for a in agents]
    group_refs = [f"group:{g}#member" for g in groups]
    state.members = {*user_refs, *agent_refs}
    for i, group in enumerate(groups):
        candidates = [*user_refs, *agent_refs, *(f"group:{g}#member" for g in groups[:i])]
        for member in rng.sample(candidates, rng.randint(0, min(3, len(candidates)))):
            state.memberships.add((member, group))
    for obj in [f"source:{s}" for s in sources] + [f"folder:{f}" for f in FOLDER_POOL]:
        for relation, pool in (
            ("viewer", [*user_refs, *group_refs]),
            ("agent_viewer", [*agent_refs, *group_refs]),
        ):
            state.grants |= {(s, relation, obj) for s in rng.sample(pool, rng.randint(0, 2))}
            if rng.random() < state.openness * (0.25 if obj.startswith("folder:") else 0.5):
                state.grants.add((state.everyone, relation, obj))
    wide = [f"source:{s}" for s in sources]
    named = wide + [f"folder:{f}" for f in FOLDER_POOL] + [f"document:{d}" for d in DOC_POOL]
    for i in range(rng.randint(2, 4)):
        pool = named if rng.random() < 0.2 else wide
        scope = tuple(rng.sample(pool, rng.randint(1, 2)))
        expiry = rng.choice(["none"] * 6 + ["future"] * 3 + ["past"])
        revoked = rng.random() < 0.1
        task = Task(rng.choice(users), rng.choice(agents), scope, expiry, revoked=revoked)
        if i == 0:
            # One task that reads every document at first (until mutations take it away):
            # every world starts with answers that have something to compare.
            task.scope, task.expiry, task.revoked = tuple(wide), "none", False
            state.grants |= {(f"user:{task.user}", "viewer", obj) for obj in wide}
            state.grants |= {(f"agent:{task.agent}", "agent_viewer", obj) for obj in wide}
        state.tasks.append(task)
    return state


class LbWorld:
    """One world of two tenants, written and read only through the load balancer (round
    robin over the replicas), compared with the oracle after every mutation."""

    def __init__(self, cluster: RunningCluster, states: list[TenantState], embeddings: Any) -> None:
        self.cluster = cluster
        self.states = states
        self.embeddings = embeddings
        self.vectors: dict[str, np.ndarray] = {}
        self.log: list[str] = []

    def fail(self, message: str) -> str:
        return f"{message}\nworld log: {self.log[-8:]}"

    def admin(self, t: int, url: str | None = None) -> httpx.Client:
        token = self.cluster.token(tenant=self.states[t].name, user=ADMIN)
        return self.cluster.client(url or self.cluster.lb_url, token)

    def expect(self, call: Call, response: httpx.Response) -> None:
        what = f"{call.method} {call.path} {json.dumps(call.body)[:300]}"
        assert response.status_code == call.status, self.fail(
            f"{what}: {response.status_code} {response.text}, expected {call.status}"
        )
        if call.code is not None:
            assert response.json()["error"]["code"] == call.code, self.fail(response.text)

    def apply(self, t: int, step: Step) -> None:
        with self.admin(t) as admin:
            for call in step.calls:
                response = admin.request(call.method, call.path, json=call.body)
                self.expect(call, response)
                if step.new_task and call.path == "/v1/tasks":
                    step.after.tasks[-1].id = response.json()["task_id"]
        self.states[t] = step.after

    def race(self, t: int, step: Step) -> None:
        """The two rival ingestions through two different replicas at the same moment."""
        (call_a, after_a), (call_b, after_b) = step.rivals
        replicas = self.cluster.replica_urls
        with self.admin(t, replicas[0]) as one, self.admin(t, replicas[1]) as two:
            a, b = _at_once([(one, call_a.path, call_a.body), (two, call_b.path, call_b.body)])
        assert sorted([a.status_code, b.status_code]) == [200, 409], self.fail(
            f"{step.what}: {a.status_code} {a.text} and {b.status_code} {b.text}"
        )
        self.states[t] = after_a if a.status_code == 200 else after_b

    def load(self, t: int, rng: random.Random) -> None:
        s = self.states[t]
        operator = self.cluster.token(tenant="platform", user="ops", operator=True)
        with self.cluster.client(self.cluster.lb_url, operator) as ops:
            _expect(ops.post("/v1/tenants", json={"id": s.name, "admin": ADMIN}), 201)
        with self.admin(t) as admin:
            for source in s.sources:
                _expect(admin.post("/v1/sources", json={"id": source, "kind": "chroma"}), 201)
            rel = [(m, "member", f"tenant:{s.name}") for m in sorted(s.members)]
            rel += [(m, "member", f"group:{g}") for m, g in sorted(s.memberships)]
            rel += sorted(s.grants)
            writes = [{"user": u, "relation": r, "object": o} for u, r, o in rel]
            _expect(admin.post("/v1/relationships", json={"writes": writes}), 200)
        for _ in range(rng.randint(3, 5)):
            step = plan_step("ingest", self.states[t], random.Random(rng.randrange(10**6)))
            assert step is not None
            self.apply(t, step)
        with self.admin(t) as admin:
            now = datetime.now(UTC)
            for task in self.states[t].tasks:
                task.id = _expect(admin.post("/v1/tasks", json=task.body(now)), 201)["task_id"]
                if task.revoked:
                    _expect(admin.delete(f"/v1/tasks/{task.id}"), 204)

    def mutate(self, t: int, rng: random.Random) -> None:
        for _ in range(10):  # a mutation that cannot apply to this state draws another
            kind = rng.choice(LB_MUTATIONS)
            step = plan_step(kind, self.states[t], random.Random(rng.randrange(10**6)))
            if step is not None:
                break
        else:
            return
        self.log.append(f"{self.states[t].name}: {step.what}")
        if step.rivals:
            self.race(t, step)
        else:
            self.apply(t, step)
        self.check_tuples(t, step.named)

    def check_tuples(self, t: int, objects: list[str]) -> None:
        state = self.states[t]
        with self.admin(t) as admin:
            for obj in dict.fromkeys(objects):
                listed = _expect(admin.get("/v1/relationships", params={"object": obj}), 200)
                found = {(r["user"], r["relation"], r["object"]) for r in listed["relationships"]}
                assert found == state.public_tuples(obj), self.fail(f"tuples on {obj}: {found}")

    def ranking(self, chunks: list[Chunk], query: str) -> list[Chunk]:
        """``chunks`` by exact cosine distance to ``query`` under the replicas' own model."""
        texts = [query, *(c.text for c in chunks)]
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            fresh = self.embeddings.embed_documents(missing)
            self.vectors.update(zip(missing, map(np.asarray, fresh), strict=True))
        q = self.vectors[query]
        ranked = [c._replace(distance=1.0 - float(q @ self.vectors[c.text])) for c in chunks]
        return sorted(ranked, key=lambda c: (c.distance, c.id))  # unit vectors: cosine

    def check_answers(self, t: int, rng: random.Random) -> int:
        """Every task presented by its own user and agent (and one by another user),
        asked through the load balancer: the oracle's top-k exactly (no leak, no miss).
        How many of the oracle's answers had something in them."""
        state = self.states[t]
        nonempty = 0
        stolen = rng.randrange(len(state.tasks))
        for i, task in enumerate(state.tasks):
            users = [task.user]
            if i == stolen:
                users += [u for u in state.users if u != task.user][:1]
            for user in users:
                permitted = state.permitted(user, task.agent, task)
                texts = [c.text for c in state.chunks(permitted, None)]
                query = " ".join(rng.choice(texts).split()[:6]) if texts else "audit report"
                k = rng.randint(1, 8)
                expected = self.ranking(state.chunks(permitted, None), query)
                token = self.cluster.token(
                    tenant=state.name, user=user, agent=task.agent, task=task.id
                )
                with self.cluster.client(self.cluster.lb_url, token) as agent:
                    response = agent.post("/v1/retrieve", json={"query": query, "k": k})
                chunks = _expect(response, 200)["chunks"]
                problems = compare(expected, chunks, k)
                assert not problems, self.fail(
                    f"{state.name} {user}/{task.agent} task {task.scope} k={k} {query!r}:\n"
                    + "\n".join(problems)
                )
                nonempty += bool(expected)
        return nonempty


def test_leak_oracle_through_the_load_balancer(cluster: RunningCluster, embeddings: Any) -> None:
    """Random worlds written and read through HAProxy: every answer, whichever replica
    gives it, is the oracle's (tests/oracle_model.py), right after each mutation."""
    seed = int(os.environ.get("SCOPEGATE_ORACLE_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    served_before = {n: int(s["stot"]) for n, s in cluster.haproxy_stats("gateways").items()}
    for w in range(int(os.environ.get("SCOPEGATE_CLUSTER_ORACLE_WORLDS", LB_WORLDS))):
        names = [f"lb{seed % 10**6}w{w}{name}" for name in ("acme", "globex")]
        world = LbWorld(cluster, [_random_tenant(n, rng) for n in names], embeddings)
        try:
            for t in range(len(world.states)):
                world.load(t, rng)
                # Something to compare from the start (the first task reads everything).
                assert world.check_answers(t, rng) > 0, world.fail("nothing to compare")
            for _ in range(LB_STEPS):
                for t in range(len(world.states)):
                    world.mutate(t, rng)
                    world.check_answers(t, rng)
            for t, state in enumerate(world.states):
                world.check_tuples(t, state.objects())
        except BaseException as exc:
            exc.add_note(f"replay: SCOPEGATE_ORACLE_SEED={seed}")
            raise
    # Every replica gave some of the answers.
    served = {n: int(s["stot"]) for n, s in cluster.haproxy_stats("gateways").items()}
    for name in (p["name"] for p in cluster.plan["gateway"]["processes"]):
        assert served[name] > served_before[name], (name, served)


# -- one replica killed under load (last: it takes a replica away for a while) -------------

LOAD_THREADS = 8
SHED_CODES = {"authorization_unavailable", "source_unavailable", "audit_unavailable"}


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all
    request_id: str | None  # the audit record's name, from the body
    chunk_ids: tuple[str, ...]
    code: str | None  # the error code of a gateway error
    after_down: bool  # sent once HAProxy had marked the killed replica down


def _load(acme: Acme, n: int, stop: threading.Event, down: threading.Event) -> list[Answer]:
    """One agent's retrievals through the load balancer until ``stop``."""
    cluster = acme.cluster
    user = ("alice", "bob")[n % 2]
    token = cluster.token(tenant=TENANT, user=user, agent=AGENT, task=acme.tasks[user])
    answers = []
    with cluster.client(cluster.lb_url, token) as agent:
        while not stop.is_set():
            after_down = down.is_set()
            try:
                response = agent.post("/v1/retrieve", json={"query": QUERY, "k": 10})
            except httpx.TransportError:
                answers.append(Answer(0, None, (), None, after_down))
                continue
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            error = body.get("error") or {}
            chunk_ids = tuple(c["chunk_id"] for c in body.get("chunks", ()))
            request_id = body.get("request_id") or error.get("request_id")
            answers.append(
                Answer(response.status_code, request_id, chunk_ids, error.get("code"), after_down)
            )
    return answers


def test_one_replica_killed_under_load_loses_no_audit_record(acme: Acme) -> None:
    cluster = acme.cluster
    victim = cluster.plan["gateway"]["processes"][1]["name"]
    stop, down = threading.Event(), threading.Event()
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        agents = [pool.submit(_load, acme, n, stop, down) for n in range(LOAD_THREADS)]
        try:
            time.sleep(2)
            served_before_kill = int(cluster.haproxy_stats("gateways")[victim]["stot"])
            cluster.kill(victim)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if cluster.haproxy_stats("gateways")[victim]["status"].startswith("DOWN"):
                    down.set()
                    break
                time.sleep(0.1)
            time.sleep(3)
        finally:
            stop.set()
        answers = [a for agent in agents for a in agent.result()]
    try:
        assert served_before_kill > 0 and down.is_set()
        # Only what the killed replica was answering may have gone unanswered (HAProxy's
        # 502, or the connection closed): at most one request per agent. Once HAProxy
        # marked it down, every request was answered by the others.
        failed = [a for a in answers if a.status != 200 and a.code not in SHED_CODES]
        assert {a.status for a in failed} <= {0, 502}, failed
        assert len(failed) <= LOAD_THREADS, [(a.status, a.after_down) for a in failed]
        after = [a for a in answers if a.after_down]
        assert after and all(a.status == 200 for a in after), after[:5]

        # Every answer given has its record in the one shared chain, which verifies.
        given = [a for a in answers if a.status == 200 or a.code in SHED_CODES]
        records = cluster.audit_records(TENANT, [str(a.request_id) for a in given])
        for a in given:
            record = records.get(str(a.request_id))
            assert record is not None, f"no audit record of {a}"
            if a.status == 200:
                assert record.returned_chunk_ids == a.chunk_ids, (a, record)
            else:
                assert (record.outcome, record.error_code) == ("error", a.code), (a, record)
        verified = cluster.verify_audit()
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
        assert "audit chain intact" in verified.stderr
    finally:
        cluster.up()
        assert "haproxy UP" in cluster.wait_status(victim, "haproxy UP")["health"]
