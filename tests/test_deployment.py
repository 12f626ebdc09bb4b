"""The scaled-out shape (DESIGN §8) on real engines, and the deployment files that mirror it.

The cluster tests run against ``scripts/cluster`` (tests/cluster.py): PostgreSQL, two
OpenFGA processes on it, a Chroma server, three gateway replicas in production mode and
HAProxy in front. The tenant is built through replica 1 only; everything else is asked
of the other replicas and of the load balancer.

The deployment tests parse ``deploy/compose.yaml``, ``deploy/haproxy.cfg`` and
``deploy/kubernetes/*.yaml`` and compare their settings with the layout the cluster
script prints (``scripts/cluster plan``), so that the files users deploy keep the shape
that is tested here.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.cluster import REPO, RunningCluster, cluster_fixture, plan_of, run_script
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
