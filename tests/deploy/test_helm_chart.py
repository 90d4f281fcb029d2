"""The Helm chart in deploy/helm/trellis, checked without a cluster and without network.

The chart is rendered by Helm's own engine — helm-python-sdk binds Helm 4's Go SDK through
ctypes, so no helm binary is involved — with the default values, with ci/production-values.yaml
and with variants that switch on every optional part. ``helm lint --strict`` runs through the
same SDK. Every rendered manifest is validated against the Kubernetes 1.30 OpenAPI schemas in
strict mode (kubernetes-validate ships them; unknown fields are errors), except the
ServiceMonitor, a CRD with no schema there, whose shape is checked by hand. Then the things that
matter are asserted: probes on the real ports and paths, settings the processes accept, the
migration hook, non-root pods, the production shape, TLS files mounted where the settings point,
credentials only from Secrets, the NetworkPolicy, and bad values refused with a clear message.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from coordinator.config import CoordinatorConfig, parse_duration
from gateway.config import GatewayConfig
from tests.deploy import _dockerfile
from worker_sdk._settings import ConnectionSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "trellis"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
KUBE_VERSION = "1.30.0"
# Not "trellis": a release name that differs from the chart name exercises the full names.
RELEASE = "acme"
NAMESPACE = "workflows"
FULLNAME = f"{RELEASE}-trellis"
COORDINATOR = f"{FULLNAME}-coordinator"
GATEWAY = f"{FULLNAME}-gateway"
MIGRATE = f"{FULLNAME}-migrate"
# Stands in for the URL of a Secret the chart does not render (database.existingSecret).
EXTERNAL_DATABASE_URL = "postgresql://trellis@db.example.internal:5432/trellis"
WORKER = f"{FULLNAME}-worker"
HOOK_ANNOTATIONS = {
    "helm.sh/hook": "pre-install,pre-upgrade",
    "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
}


# -- rendering -------------------------------------------------------------------------------


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` deep-merged into a copy of ``base`` (what repeated -f files do)."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


PRODUCTION: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
WORKER_ON = {
    "worker": {
        "enabled": True,
        "image": {"repository": "registry.example.com/diamond-worker", "tag": "1.0.0"},
        "command": ["python", "/app/diamond_worker.py"],
        "env": [{"name": "TRELLIS_LOG_LEVEL", "value": "DEBUG"}],
    }
}
# TLS and credentials come from Secrets made outside the chart (these names stand in for them).
TLS_SECRET = "trellis-coordinator-tls"
TLS_ON: dict[str, Any] = {"tls": {"enabled": True, "existingSecret": TLS_SECRET}}
MTLS_ON: dict[str, Any] = merged(
    TLS_ON,
    {
        "tls": {
            "clientCA": {
                "enabled": True,
                "existingSecret": "trellis-client-ca",
                "gatewaySecret": "trellis-gateway-cert",
                "workerSecret": "trellis-worker-cert",
            }
        }
    },
)
AUTH_SECRETS: dict[str, Any] = {
    "auth": {
        "bootstrapAdminKey": {"existingSecret": "trellis-auth", "key": "bootstrap-admin-key"},
        "secretKeys": {"existingSecret": "trellis-auth", "key": "secret-keys"},
        "encryptionKeys": {"existingSecret": "trellis-encryption", "key": "encryption-keys"},
        "gatewayApiKey": {"existingSecret": "trellis-gateway-key", "key": "api-key"},
        "workerApiKey": {"existingSecret": "trellis-worker-key", "key": "api-key"},
    }
}
# Each credential the chart passes on, with the Secret and key it must come from.
CREDENTIALS = {
    "TRELLIS_BOOTSTRAP_ADMIN_KEY": ("coordinator", "trellis-auth", "bootstrap-admin-key"),
    "TRELLIS_SECRET_KEYS": ("coordinator", "trellis-auth", "secret-keys"),
    "TRELLIS_ENCRYPTION_KEYS": ("coordinator", "trellis-encryption", "encryption-keys"),
    "TRELLIS_GATEWAY_API_KEY": ("gateway", "trellis-gateway-key", "api-key"),
    "TRELLIS_API_KEY": ("worker", "trellis-worker-key", "api-key"),
}
OIDC_ON = {
    "auth": {
        "oidc": {
            "issuer": "https://login.example.com/",
            "audience": "trellis",
            "jwksUrl": "https://login.example.com/.well-known/jwks.json",
        }
    }
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": PRODUCTION,
    # Every optional template on: worker, ServiceMonitor, a percentage PDB.
    "production-everything": merged(
        PRODUCTION,
        {
            **WORKER_ON,
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "pdb": {"maxUnavailable": None, "minAvailable": "50%"},
            "autoscaling": {"targetMemoryUtilizationPercentage": 80},
        },
    ),
    # What docs/deployment.md recommends: the production file with the URL in your own Secret.
    "production-existing-secret": merged(
        PRODUCTION, {"database": {"url": "", "existingSecret": "trellis-db"}}
    ),
    "existing-secret": {
        "database": {"existingSecret": "trellis-db", "existingSecretKey": "url"},
        "coordinator": {"replicas": 2},
    },
    "sqlite-persistent": {
        "database": {"sqlite": {"persistence": {"enabled": True, "storageClassName": "fast"}}}
    },
    "tls": merged(TLS_ON, WORKER_ON),
    "tls-server-name": merged(
        TLS_ON,
        {"tls": {"serverName": f"{FULLNAME}-coordinator.{NAMESPACE}.svc", "caSecret": "ca"}},
    ),
    "mtls": merged(MTLS_ON, WORKER_ON),
    "auth-secrets": merged(AUTH_SECRETS, WORKER_ON),
    "oidc": OIDC_ON,
    "insecure-open": {"auth": {"insecureOpen": True, "reflection": True}},
    "network-policy-off": {"networkPolicy": {"enabled": False}},
    "network-policy-custom": merged(
        WORKER_ON,
        {
            "networkPolicy": {
                "workers": [
                    {
                        "podSelector": {"matchLabels": {"app": "billing-worker"}},
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "billing"}
                        },
                    }
                ],
                "extraFrom": [
                    {"ipBlock": {"cidr": "10.20.0.0/16"}},
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}},
                ],
            }
        },
    ),
    # The production file with everything security switched on.
    "production-secure": merged(
        merged(PRODUCTION, {**WORKER_ON, "database": {"url": "", "existingSecret": "trellis-db"}}),
        merged(merged(MTLS_ON, AUTH_SECRETS), OIDC_ON),
    ),
}


@dataclass
class Rendered:
    docs: list[dict[str, Any]]
    notes: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for doc in self.all(kind):
            if doc["metadata"]["name"] == name:
                return doc
        return None

    def one(self, kind: str, name: str) -> dict[str, Any]:
        doc = self.find(kind, name)
        rendered = [(d["kind"], d["metadata"]["name"]) for d in self.docs]
        assert doc is not None, f"no {kind} {name!r}; rendered: {rendered}"
        return doc

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for doc in self.docs:
            if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
                yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(
    chart: helm.Chart, values: dict[str, Any] | None = None, release: str = RELEASE
) -> Rendered:
    """What ``helm install acme deploy/helm/trellis -n workflows -f values`` would apply."""
    manifests = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(docs=docs, notes=notes)


@pytest.fixture(scope="module")
def default(chart: helm.Chart) -> Rendered:
    return render(chart)


@pytest.fixture(scope="module")
def production(chart: helm.Chart) -> Rendered:
    return render(chart, PRODUCTION)


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    containers = pod_owner["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"container {name!r} in {[c['name'] for c in containers]}"
    return found[0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port!r}"
    return int(named[0])


def listen_port(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_env(rendered: Rendered, c: dict[str, Any]) -> dict[str, str]:
    """The environment a container starts with: the image's ENV, then envFrom, then env."""
    env = dict(_dockerfile.stages()[-1].env())
    for source in c.get("envFrom", []):
        env.update(rendered.one("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = rendered.find("Secret", ref["name"])
        if secret is None:  # an existingSecret, made outside the chart
            env[item["name"]] = (
                EXTERNAL_DATABASE_URL
                if item["name"] == "TRELLIS_DATABASE_URL"
                else f"{ref['name']}/{ref['key']}"
            )
        else:
            assert ref["key"] in secret["data"], f"Secret {ref['name']} has no key {ref['key']}"
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def mounted_files(pod_owner: dict[str, Any], c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every file a container sees from a Secret: its path -> (Secret name, key)."""
    volumes = {v["name"]: v for v in pod_owner["spec"]["template"]["spec"]["volumes"]}
    files: dict[str, tuple[str, str]] = {}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "projected" in volume:
            sources = [s["secret"] for s in volume["projected"]["sources"] if "secret" in s]
        elif "secret" in volume:
            sources = [{"name": volume["secret"]["secretName"], **volume["secret"]}]
        else:
            continue
        # A subPath mount is never updated when the Secret changes (no in-place renewal).
        assert "subPath" not in mount, mount
        assert mount.get("readOnly") is True, mount
        for source in sources:
            assert source.get("items"), f"{mount['name']}: name the keys, so a missing one fails"
            for item in source["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (source["name"], item["key"])
    return files


# -- Chart.yaml and lint ---------------------------------------------------------------------


def test_chart_metadata_is_complete_and_tracks_the_package_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "trellis"
    assert meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), meta["version"]
    # image.tag defaults to appVersion: it must name the release the chart ships.
    assert meta["appVersion"] == pyproject["project"]["version"]
    assert meta["description"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "variant", ["default", "production", "production-everything", "production-secure"]
)
def test_helm_lint_strict_passes(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    # Severity 1 is INFO (e.g. "icon is recommended"); --strict fails on WARNING (2) and ERROR (3).
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    assert report["errors"] == []


# -- Kubernetes schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_manifest_is_valid_for_kubernetes_1_30(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    errors = []
    for doc in rendered.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate; see test_service_monitor_*
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert errors == []


def test_default_install_renders_the_development_set(default: Rendered) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default.docs)
    assert kinds == [
        ("ConfigMap", COORDINATOR),
        ("ConfigMap", GATEWAY),
        ("Deployment", COORDINATOR),
        ("Deployment", GATEWAY),
        ("NetworkPolicy", COORDINATOR),
        ("PodDisruptionBudget", COORDINATOR),
        ("PodDisruptionBudget", GATEWAY),
        ("Service", COORDINATOR),
        ("Service", GATEWAY),
    ]


def test_names_fit_in_a_dns_label_for_the_longest_release_name(chart: helm.Chart) -> None:
    release = "r" * 53  # Helm's limit
    rendered = render(chart, VARIANTS["production-everything"], release=release)
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered.docs]
    assert len(set(names)) == len(names), names
    for kind, name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), (kind, name)


# -- probes and ports ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected_port"),
    [({}, 7400), (PRODUCTION, 7400), ({"coordinator": {"port": 9400}}, 9400)],
    ids=["default", "production", "port-9400"],
)
def test_coordinator_grpc_probes_target_the_port_it_listens_on(
    chart: helm.Chart, values: dict[str, Any], expected_port: int
) -> None:
    rendered = render(chart, values)
    deployment = rendered.one("Deployment", COORDINATOR)
    c = container(deployment, "coordinator")
    assert c["args"] == ["coordinator", "serve"]
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("grpc", expected_port)
    assert listen_port(container_env(rendered, c)["TRELLIS_LISTEN"]) == expected_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # Native gRPC probe on the standard health service ("" = the whole server).
        assert c[probe]["grpc"]["port"] == expected_port, probe
        assert c[probe]["grpc"].get("service", "") == ""
    service = rendered.one("Service", COORDINATOR)
    (service_port,) = service["spec"]["ports"]
    assert port_number(c, service_port["targetPort"]) == expected_port
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("variant", ["default", "production"])
def test_gateway_probes_hit_healthz_and_readyz_on_its_port(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    deployment = rendered.one("Deployment", GATEWAY)
    c = container(deployment, "gateway")
    assert c["args"] == ["gateway", "serve"]
    (port,) = c["ports"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == port["containerPort"]
    env = container_env(rendered, c)
    assert listen_port(env["TRELLIS_GATEWAY_LISTEN"]) == port["containerPort"]
    assert env["TRELLIS_GATEWAY_LISTEN"].startswith("0.0.0.0:")
    # /readyz asks the coordinator through its Service.
    coordinator_service = rendered.one("Service", COORDINATOR)
    assert env["TRELLIS_GATEWAY_COORDINATOR_ADDRESS"] == (
        f"{COORDINATOR}:{coordinator_service['spec']['ports'][0]['port']}"
    )
    # The probe must outlast /readyz's own wait for the coordinator, or it fails on a slow answer.
    ready_timeout = parse_duration("ready", env["TRELLIS_GATEWAY_READY_TIMEOUT"]).total_seconds()
    assert c["readinessProbe"]["timeoutSeconds"] > ready_timeout
    service = rendered.one("Service", GATEWAY)
    assert port_number(c, service["spec"]["ports"][0]["targetPort"]) == port["containerPort"]


# -- settings the processes accept -----------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_coordinator_and_migration_env_is_accepted_by_coordinator_config(
    chart: helm.Chart, variant: str
) -> None:
    """The coordinator refuses unknown TRELLIS_* names: nothing reserved may leak into it."""
    rendered = render(chart, VARIANTS[variant])
    coordinator = container(rendered.one("Deployment", COORDINATOR), "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, coordinator))
    assert config.listen == f"0.0.0.0:{coordinator['ports'][0]['containerPort']}"
    job = rendered.find("Job", MIGRATE)
    if config.database_url.startswith("sqlite"):
        assert config.auto_migrate is True
        assert job is None  # the Job could not reach a file inside the coordinator's pod
        mount_dirs = {m["mountPath"] for m in coordinator["volumeMounts"]}
        assert str(Path(config.database_url.removeprefix("sqlite:///")).parent) in mount_dirs
    else:
        assert config.database_url.startswith("postgresql://")
        assert config.auto_migrate is False
        assert job is not None
        migrate = container(job, "migrate")
        assert CoordinatorConfig.from_env(container_env(rendered, migrate)).database_url == (
            config.database_url
        )


@pytest.mark.parametrize("variant", ["default", "production", "tls", "mtls", "auth-secrets"])
def test_gateway_env_is_accepted_by_gateway_config(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    c = container(rendered.one("Deployment", GATEWAY), "gateway")
    config = GatewayConfig.from_env(container_env(rendered, c))
    assert config.host_port == ("0.0.0.0", c["ports"][0]["containerPort"])


def test_gateway_slow_client_and_connection_settings_reach_the_gateway(
    chart: helm.Chart,
) -> None:
    def config(settings: dict[str, Any]) -> GatewayConfig:
        rendered = render(chart, {"gateway": {"settings": settings}})
        c = container(rendered.one("Deployment", GATEWAY), "gateway")
        return GatewayConfig.from_env(container_env(rendered, c))

    default = config({})
    assert (default.header_timeout, default.body_timeout, default.max_connections) == (
        10.0,
        30.0,
        1000,
    )
    custom = config(
        {
            "headerTimeout": "2s",
            "bodyTimeout": "1500ms",
            "maxConnections": 50,
            "maxBodyBytes": 4096,
            "rpcTimeout": 3,
        }
    )
    assert (custom.header_timeout, custom.body_timeout, custom.max_connections) == (2.0, 1.5, 50)
    assert (custom.max_body_bytes, custom.rpc_timeout) == (4096, 3.0)


@pytest.mark.parametrize("grace", ["10s", "1m", "1500ms", 45, "2.5"])
def test_termination_grace_covers_prestop_and_shutdown_grace(
    chart: helm.Chart, grace: str | int
) -> None:
    rendered = render(
        chart, {"coordinator": {"settings": {"shutdownGrace": grace}, "preStopSleepSeconds": 7}}
    )
    deployment = rendered.one("Deployment", COORDINATOR)
    c = container(deployment, "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, c))
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGTERM comes after the preStop hook; the coordinator then drains for shutdown_grace.
    assert pod_grace >= 7 + config.shutdown_grace.total_seconds() + 1


def test_config_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = render(chart, values).one("Deployment", COORDINATOR)
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"coordinator": {"settings": {"logLevel": "DEBUG"}}})


# -- migration -------------------------------------------------------------------------------


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(production: Rendered) -> None:
    job = production.one("Job", MIGRATE)
    annotations = job["metadata"]["annotations"]
    assert annotations.items() >= HOOK_ANNOTATIONS.items()
    c = container(job, "migrate")
    # No command: the image's ENTRYPOINT is trellis, so this runs `trellis migrate`.
    assert "command" not in c
    assert c["args"] == ["migrate"]
    assert (
        c["image"] == container(production.one("Deployment", COORDINATOR), "coordinator")["image"]
    )
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # A pre-install hook runs before the release's own Secret exists: the URL must come from a
    # hook Secret created before the Job (lower weight) with the same hooks.
    ref = next(e for e in c["env"] if e["name"] == "TRELLIS_DATABASE_URL")["valueFrom"]
    secret = production.one("Secret", ref["secretKeyRef"]["name"])
    assert secret["metadata"]["annotations"].items() >= HOOK_ANNOTATIONS.items()
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        annotations["helm.sh/hook-weight"]
    )
    coordinator = container(production.one("Deployment", COORDINATOR), "coordinator")
    assert container_env(production, coordinator)["TRELLIS_AUTO_MIGRATE"] == "false"


def test_migration_job_reads_an_existing_secret_directly(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["existing-secret"])
    c = container(rendered.one("Job", MIGRATE), "migrate")
    ref = next(e for e in c["env"] if e["name"] == "TRELLIS_DATABASE_URL")["valueFrom"]
    assert ref["secretKeyRef"] == {"name": "trellis-db", "key": "url"}
    assert rendered.all("Secret") == []


def test_migration_can_be_disabled(chart: helm.Chart) -> None:
    rendered = render(chart, merged(PRODUCTION, {"migration": {"enabled": False}}))
    assert rendered.all("Job") == []
    assert "run `trellis migrate` yourself" in rendered.notes


# -- SQLite (the default) --------------------------------------------------------------------


def test_default_is_one_sqlite_coordinator_replaced_not_rolled(default: Rendered) -> None:
    deployment = default.one("Deployment", COORDINATOR)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert default.all("Secret") == []


def test_sqlite_persistence_uses_a_claim(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["sqlite-persistent"])
    claim = rendered.one("PersistentVolumeClaim", f"{FULLNAME}-data")
    assert claim["spec"]["storageClassName"] == "fast"
    volumes = rendered.one("Deployment", COORDINATOR)["spec"]["template"]["spec"]["volumes"]
    data = next(v for v in volumes if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_container_runs_as_root_or_writes_its_root_filesystem(
    chart: helm.Chart, variant: str
) -> None:
    rendered = render(chart, VARIANTS[variant])
    pods = list(rendered.pod_specs())
    assert pods
    for where, spec in pods:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] != 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        # Service links would inject e.g. ACME_TRELLIS_COORDINATOR_PORT — and, for a release
        # named trellis, TRELLIS_COORDINATOR_*, which the coordinator refuses as unknown settings.
        assert spec["enableServiceLinks"] is False, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            what = f"{where} container {c['name']}"
            assert sc["runAsNonRoot"] is True, what
            assert sc["runAsUser"] != 0, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc.get("privileged", False) is False, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            assert "add" not in sc["capabilities"], what
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{what}: no emptyDir on /tmp"


def test_pods_run_as_the_image_user(default: Rendered) -> None:
    (user,) = _dockerfile.stages()[-1].args("USER")
    uid, _, gid = user.partition(":")
    for where, spec in default.pod_specs():
        assert spec["securityContext"]["runAsUser"] == int(uid), where
        assert spec["securityContext"]["fsGroup"] == int(gid), where


def test_secrets_stay_out_of_config_maps(production: Rendered) -> None:
    secret = production.one("Secret", FULLNAME)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "database-url": PRODUCTION["database"]["url"],
        "redis-url": PRODUCTION["redis"]["url"],
    }
    for config_map in production.all("ConfigMap"):
        for value in config_map["data"].values():
            assert value not in decoded.values(), config_map["metadata"]["name"]
    # The coordinators read the Redis URL from the Secret (shared limits and breakers).
    coordinator = production.one("Deployment", COORDINATOR)
    [container] = coordinator["spec"]["template"]["spec"]["containers"]
    redis_env = [e for e in container["env"] if e["name"] == "TRELLIS_REDIS_URL"]
    assert redis_env == [
        {
            "name": "TRELLIS_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": FULLNAME, "key": "redis-url"}},
        }
    ]


# -- transport: TLS or plaintext, chosen explicitly ------------------------------------------


def tls_enabled(values: dict[str, Any]) -> bool:
    return bool(values.get("tls", {}).get("enabled"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_process_would_start_with_its_transport_settings(
    chart: helm.Chart, variant: str
) -> None:
    """What `coordinator serve`, `gateway serve` and the worker SDK check before they connect:
    TLS whose files are mounted from the right Secret keys, or plaintext chosen explicitly.
    The settings are read by the config classes themselves, so a renamed variable fails here."""
    values = VARIANTS[variant]
    rendered = render(chart, values)
    tls = tls_enabled(values)
    deployment = rendered.one("Deployment", COORDINATOR)
    coordinator = container(deployment, "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, coordinator))
    config.check_serving()
    assert config.plaintext is (not tls)
    files = mounted_files(deployment, coordinator)
    if tls:
        secret = values["tls"]["existingSecret"]
        assert files[config.tls_cert_file] == (secret, "tls.crt")
        assert files[config.tls_key_file] == (secret, "tls.key")
    else:
        assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
            "",
            "",
            "",
        )
        assert files == {}

    gateway = rendered.find("Deployment", GATEWAY)
    if gateway is not None:
        c = container(gateway, "gateway")
        connection = GatewayConfig.from_env(container_env(rendered, c)).connection
        assert connection.address == f"{COORDINATOR}:7400"
        _check_client_files(values, connection, mounted_files(gateway, c), "gatewaySecret")

    worker = rendered.find("Deployment", WORKER)
    if worker is not None:
        c = container(worker, "worker")
        settings = ConnectionSettings.from_env(container_env(rendered, c))
        settings.check()
        assert settings.address == f"{COORDINATOR}:7400"
        _check_client_files(values, settings, mounted_files(worker, c), "workerSecret")


def _check_client_files(
    values: dict[str, Any],
    settings: ConnectionSettings,
    files: dict[str, tuple[str, str]],
    client_secret: str,
) -> None:
    if not tls_enabled(values):
        assert settings.tls is None and settings.insecure is True
        assert files == {}
        return
    tls = values["tls"]
    assert settings.tls is not None and settings.insecure is False
    assert settings.tls.ca_file is not None
    ca_secret = tls.get("caSecret") or tls["existingSecret"]
    assert files[settings.tls.ca_file] == (ca_secret, tls.get("caKey", "ca.crt"))
    assert settings.tls.server_name == (tls.get("serverName") or None)
    client_ca = tls.get("clientCA", {})
    if client_ca.get("enabled"):
        assert settings.tls.cert_file is not None and settings.tls.key_file is not None
        assert files[settings.tls.cert_file] == (client_ca[client_secret], "tls.crt")
        assert files[settings.tls.key_file] == (client_ca[client_secret], "tls.key")
    else:
        assert settings.tls.cert_file is None and settings.tls.key_file is None


def test_default_serves_plaintext_explicitly(default: Rendered) -> None:
    coordinator = container(default.one("Deployment", COORDINATOR), "coordinator")
    assert container_env(default, coordinator)["TRELLIS_PLAINTEXT"] == "true"
    gateway = container(default.one("Deployment", GATEWAY), "gateway")
    assert container_env(default, gateway)["TRELLIS_GATEWAY_COORDINATOR_INSECURE"] == "true"
    assert "PLAINTEXT" in default.notes


def test_tls_mounts_the_secret_read_only_without_sub_path(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["tls"])
    deployment = rendered.one("Deployment", COORDINATOR)
    c = container(deployment, "coordinator")
    env = container_env(rendered, c)
    assert "TRELLIS_PLAINTEXT" not in env
    assert "TRELLIS_TLS_CLIENT_CA_FILE" not in env
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    # A projected volume: Kubernetes swaps the files in place when the Secret is renewed, and
    # the coordinator reloads them before the next handshake. subPath would freeze them.
    assert mount == {"name": "tls", "mountPath": "/etc/trellis/tls", "readOnly": True}
    projected = volumes["tls"]["projected"]
    assert projected["defaultMode"] == 0o440  # readable by the pod's group (fsGroup) only
    assert [s["secret"]["name"] for s in projected["sources"]] == [TLS_SECRET]
    assert env["TRELLIS_TLS_CERT_FILE"] == "/etc/trellis/tls/tls.crt"
    # Only the TLS mount changes: the certificate reaches no one else.
    gateway = rendered.one("Deployment", GATEWAY)
    gateway_files = mounted_files(gateway, container(gateway, "gateway"))
    assert set(gateway_files.values()) == {(TLS_SECRET, "ca.crt")}


def test_tls_replaces_the_grpc_probes_with_tcp_probes(chart: helm.Chart) -> None:
    """The kubelet's gRPC probe has no TLS: against a TLS port it would fail for ever."""
    c = container(render(chart, VARIANTS["tls"]).one("Deployment", COORDINATOR), "coordinator")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in c[probe], probe
        assert port_number(c, c[probe]["tcpSocket"]["port"]) == 7400, probe


def test_mutual_tls_mounts_the_client_ca_and_each_clients_certificate(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["mtls"])
    deployment = rendered.one("Deployment", COORDINATOR)
    c = container(deployment, "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, c))
    assert mounted_files(deployment, c)[config.tls_client_ca_file] == (
        "trellis-client-ca",
        "ca.crt",
    )
    # Checked per client by test_every_process_would_start_with_its_transport_settings; here:
    # the gateway and the worker each get their own certificate, never the server's key.
    for name, component, secret in (
        (GATEWAY, "gateway", "trellis-gateway-cert"),
        (WORKER, "worker", "trellis-worker-cert"),
    ):
        owner = rendered.one("Deployment", name)
        files = mounted_files(owner, container(owner, component))
        assert {key for _, key in files.values()} == {"ca.crt", "tls.crt", "tls.key"}
        assert {s for s, key in files.values() if key != "ca.crt"} == {secret}
    assert "mutual TLS" in rendered.notes


# -- authentication: credentials only from Secrets -------------------------------------------


def test_credentials_come_from_secret_key_refs_never_literal_values(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["auth-secrets"])
    owners = {"coordinator": COORDINATOR, "gateway": GATEWAY, "worker": WORKER}
    for variable, (component, secret, key) in CREDENTIALS.items():
        c = container(rendered.one("Deployment", owners[component]), component)
        entries = [e for e in c.get("env", []) if e["name"] == variable]
        assert entries == [
            {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        ], variable
    # The chart renders no Secret of its own for them, and no ConfigMap names them.
    assert rendered.all("Secret") == []
    for config_map in rendered.all("ConfigMap"):
        assert not set(config_map["data"]) & set(CREDENTIALS), config_map["metadata"]["name"]
    # The variable names are the ones the processes read.
    coordinator = container(rendered.one("Deployment", COORDINATOR), "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, coordinator))
    assert config.bootstrap_admin_key == "trellis-auth/bootstrap-admin-key"
    assert config.secret_keys == "trellis-auth/secret-keys"
    gateway = container(rendered.one("Deployment", GATEWAY), "gateway")
    assert GatewayConfig.from_env(container_env(rendered, gateway)).api_key == (
        "trellis-gateway-key/api-key"
    )
    worker = container(rendered.one("Deployment", WORKER), "worker")
    assert ConnectionSettings.from_env(container_env(rendered, worker)).api_key == (
        "trellis-worker-key/api-key"
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_credential_is_ever_a_literal(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    for where, spec in rendered.pod_specs():
        for c in spec["containers"]:
            for entry in c.get("env", []):
                if entry["name"] in CREDENTIALS:
                    assert "value" not in entry, f"{where}: {entry['name']}"


def test_default_sets_no_credential_and_keeps_authentication_on(default: Rendered) -> None:
    c = container(default.one("Deployment", COORDINATOR), "coordinator")
    env = container_env(default, c)
    assert not set(env) & set(CREDENTIALS)
    config = CoordinatorConfig.from_env(env)
    assert config.insecure_open is False
    assert config.reflection is False
    assert "WARNING" not in default.notes
    # The gateway has no key yet: the notes say how to give it one.
    assert "auth.gatewayApiKey" in default.notes


def test_insecure_open_is_passed_on_with_a_loud_warning(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["insecure-open"])
    c = container(rendered.one("Deployment", COORDINATOR), "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, c))
    assert config.insecure_open is True
    assert config.reflection is True
    first_lines = rendered.notes.lstrip().splitlines()[:3]
    assert any("WARNING" in line and "AUTHENTICATION IS OFF" in line for line in first_lines)
    assert "ADMIN" in rendered.notes


def test_oidc_settings_reach_the_coordinator(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["oidc"])
    c = container(rendered.one("Deployment", COORDINATOR), "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, c))
    oidc = OIDC_ON["auth"]["oidc"]
    assert (config.oidc_issuer, config.oidc_audience, config.oidc_jwks_url) == (
        oidc["issuer"],
        oidc["audience"],
        oidc["jwksUrl"],
    )
    assert (config.oidc_tenant_claim, config.oidc_roles_claim) == (
        "trellis_tenant",
        "trellis_roles",
    )
    default_env = container_env(render(chart), c)
    assert not any(name.startswith("TRELLIS_OIDC_") for name in default_env)


def test_notification_allow_lists_reach_the_coordinator(chart: helm.Chart) -> None:
    values = {
        "coordinator": {
            "notifications": {
                "allowHosts": ["hooks.internal.example", "*.svc.cluster.local"],
                "allowNetworks": ["10.20.0.0/16", "fd12::/64"],
            }
        }
    }
    rendered = render(chart, values)
    c = container(rendered.one("Deployment", COORDINATOR), "coordinator")
    config = CoordinatorConfig.from_env(container_env(rendered, c))
    assert config.notify_allow_hosts == "hooks.internal.example,*.svc.cluster.local"
    assert config.notify_allow_networks == "10.20.0.0/16,fd12::/64"
    # By default nothing is allowed besides public addresses.
    default_env = container_env(render(chart), c)
    assert not any(name.startswith("TRELLIS_NOTIFY_ALLOW_") for name in default_env)
    with pytest.raises(helm.HelmValuesError, match="allowNetworks"):
        chart.validate_schema({"coordinator": {"notifications": {"allowNetworks": ["any"]}}})


# -- NetworkPolicy ---------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels are evaluated here"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _pod_labels(rendered: Rendered, name: str) -> dict[str, str]:
    labels: dict[str, str] = rendered.one("Deployment", name)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def test_network_policy_admits_only_the_gateway_and_workers_on_the_grpc_port(
    default: Rendered,
) -> None:
    policy = default.one("NetworkPolicy", COORDINATOR)
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    coordinator = default.one("Deployment", COORDINATOR)
    assert spec["podSelector"]["matchLabels"] == coordinator["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]  # egress (database, webhooks) is not restricted
    (rule,) = spec["ingress"]
    c = container(coordinator, "coordinator")
    assert rule["ports"] == [{"port": c["ports"][0]["containerPort"], "protocol": "TCP"}]
    peers = rule["from"]
    # The chart's gateway pods, and nothing else of the release (not the coordinator itself).
    assert any(_selects(p["podSelector"], _pod_labels(default, GATEWAY)) for p in peers)
    assert not any(
        _selects(p["podSelector"], _pod_labels(default, COORDINATOR))
        for p in peers
        if "podSelector" in p
    )
    # Workers: labelled trellis.dev/role=worker, in this namespace only (no namespaceSelector).
    assert {"podSelector": {"matchLabels": {"trellis.dev/role": "worker"}}} in peers
    assert all("namespaceSelector" not in p and "ipBlock" not in p for p in peers)


def test_network_policy_admits_the_example_worker(chart: helm.Chart) -> None:
    for variant in ("tls", "network-policy-custom"):
        rendered = render(chart, VARIANTS[variant])
        labels = _pod_labels(rendered, WORKER)
        (rule,) = rendered.one("NetworkPolicy", COORDINATOR)["spec"]["ingress"]
        same_namespace = [p for p in rule["from"] if set(p) == {"podSelector"}]
        assert any(_selects(p["podSelector"], labels) for p in same_namespace), variant
    # ... and carries the documented worker label.
    assert _pod_labels(render(chart, WORKER_ON), WORKER)["trellis.dev/role"] == "worker"


def test_network_policy_takes_worker_selectors_and_extra_peers(chart: helm.Chart) -> None:
    values = VARIANTS["network-policy-custom"]["networkPolicy"]
    rendered = render(chart, VARIANTS["network-policy-custom"])
    (rule,) = rendered.one("NetworkPolicy", COORDINATOR)["spec"]["ingress"]
    # The chart's gateway and example worker, then the given workers (replacing the default
    # label, not merged with it: a list) and the extra peers, in order.
    assert rule["from"][2:] == values["workers"] + values["extraFrom"]
    assert {"podSelector": {"matchLabels": {"trellis.dev/role": "worker"}}} not in rule["from"]
    # {} means every namespace, and is kept as such.
    every_namespace = [
        {"podSelector": {"matchLabels": {"trellis.dev/role": "worker"}}, "namespaceSelector": {}}
    ]
    rendered = render(chart, {"networkPolicy": {"workers": every_namespace}})
    (rule,) = rendered.one("NetworkPolicy", COORDINATOR)["spec"]["ingress"]
    assert rule["from"][1:] == every_namespace


def test_network_policy_without_any_client_admits_nothing(chart: helm.Chart) -> None:
    """An ingress rule without `from` would admit every source: there must be no rule."""
    rendered = render(chart, {"gateway": {"enabled": False}, "networkPolicy": {"workers": []}})
    spec = rendered.one("NetworkPolicy", COORDINATOR)["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == []


def test_network_policy_can_be_disabled(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["network-policy-off"])
    assert rendered.all("NetworkPolicy") == []
    assert "NetworkPolicy" not in rendered.notes


def test_network_policy_without_gateway_admits_workers_only(chart: helm.Chart) -> None:
    rendered = render(chart, {"gateway": {"enabled": False}})
    (rule,) = rendered.one("NetworkPolicy", COORDINATOR)["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"trellis.dev/role": "worker"}}}]


# -- production shape ------------------------------------------------------------------------


def test_production_runs_three_autoscaled_coordinators_behind_an_ingress(
    production: Rendered,
) -> None:
    deployment = production.one("Deployment", COORDINATOR)
    # The HorizontalPodAutoscaler owns the count: an upgrade must not reset it.
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    hpa = production.one("HorizontalPodAutoscaler", COORDINATOR)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": COORDINATOR,
    }
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["maxReplicas"] >= 3
    ingress = production.one("Ingress", GATEWAY)
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "trellis.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    gateway_service = production.one("Service", GATEWAY)
    assert backend["name"] == GATEWAY
    assert backend["port"]["name"] in {p["name"] for p in gateway_service["spec"]["ports"]}
    assert ingress["spec"]["tls"][0]["hosts"] == ["trellis.example.com"]
    for name in (COORDINATOR, GATEWAY):
        pdb = production.one("PodDisruptionBudget", name)
        selected = production.one("Deployment", name)["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["selector"]["matchLabels"] == selected


def test_production_without_autoscaling_runs_three_coordinators(chart: helm.Chart) -> None:
    rendered = render(chart, merged(PRODUCTION, {"autoscaling": {"enabled": False}}))
    assert rendered.one("Deployment", COORDINATOR)["spec"]["replicas"] == 3
    assert rendered.all("HorizontalPodAutoscaler") == []


# -- optional parts --------------------------------------------------------------------------


def test_example_worker_is_off_by_default_and_points_at_the_coordinator(
    chart: helm.Chart, default: Rendered
) -> None:
    assert default.find("Deployment", f"{FULLNAME}-worker") is None
    rendered = render(chart, WORKER_ON)
    c = container(rendered.one("Deployment", f"{FULLNAME}-worker"), "worker")
    assert c["image"] == "registry.example.com/diamond-worker:1.0.0"
    assert c["command"] == ["python", "/app/diamond_worker.py"]
    env = {e["name"]: e["value"] for e in c["env"]}
    service = rendered.one("Service", COORDINATOR)
    assert env["TRELLIS_ADDRESS"] == f"{COORDINATOR}:{service['spec']['ports'][0]['port']}"
    assert env["TRELLIS_LOG_LEVEL"] == "DEBUG"


def test_service_monitor_only_when_enabled_and_aimed_at_the_gateway(
    chart: helm.Chart, production: Rendered
) -> None:
    assert production.all("ServiceMonitor") == []
    rendered = render(chart, VARIANTS["production-everything"])
    (monitor,) = rendered.all("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = rendered.one("Service", GATEWAY)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    # Only the gateway Service may match, or Prometheus would scrape the gRPC port.
    coordinator_labels = rendered.one("Service", COORDINATOR)["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= coordinator_labels
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_notes_say_how_to_reach_it(default: Rendered, production: Rendered) -> None:
    for rendered in (default, production):
        notes = rendered.notes
        assert f"kubectl --namespace {NAMESPACE} port-forward service/{COORDINATOR} 7400:7400" in (
            notes
        )
        assert "trellis --address 127.0.0.1:7400" in notes
        assert f"port-forward service/{GATEWAY} 8080:8080" in notes
    assert "https://trellis.example.com/" in production.notes
    assert "Redis support is reserved" in production.notes
    assert "SQLite" in default.notes


# -- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"coordinator": {"replicas": "three"}}, ["/coordinator/replicas", "want integer"]),
        ({"coordinator": {"replicas": -1}}, ["/coordinator/replicas", "minimum"]),
        ({"coordinator": {"replica": 3}}, ["/coordinator", "additional properties 'replica'"]),
        ({"replicas": 3}, ["additional properties 'replicas'"]),
        ({"coordinator": {"settings": {"logLevel": "LOUD"}}}, ["/coordinator/settings/logLevel"]),
        (
            {"coordinator": {"settings": {"pollMaxWait": "soon"}}},
            ["/coordinator/settings/pollMaxWait"],
        ),
        ({"coordinator": {"settings": {"redisUrl": "x"}}}, ["additional properties 'redisUrl'"]),
        ({"coordinator": {"port": 70000}}, ["/coordinator/port", "maximum"]),
        ({"securityContext": {"runAsUser": 0}}, ["/securityContext/runAsUser", "minimum"]),
        ({"database": {"url": "mysql://db/trellis"}}, ["/database/url"]),
        ({"image": {"pullPolicy": "Sometimes"}}, ["/image/pullPolicy", "IfNotPresent"]),
        ({"worker": {"enabled": True}}, ["/worker/image/repository"]),
        ({"gateway": {"ingress": {"enabled": True, "hosts": []}}}, ["/gateway/ingress/hosts"]),
        ({"autoscaling": {"targetCPUUtilizationPercentage": 150}}, ["targetCPUUtilization"]),
        # A secret value itself is refused: only a reference to a Secret is accepted.
        ({"auth": {"bootstrapAdminKey": "hunter2hunter2hunter2"}}, ["/auth/bootstrapAdminKey"]),
        (
            {"auth": {"secretKeys": {"existingSecret": "s", "key": "k", "value": "k1:x"}}},
            ["/auth/secretKeys", "additional properties 'value'"],
        ),
        ({"auth": {"gatewayApiKey": {"value": "trk_..."}}}, ["/auth/gatewayApiKey"]),
        ({"auth": {"insecureOpen": "yes"}}, ["/auth/insecureOpen", "want boolean"]),
        ({"tls": {"existingSecret": "Not A Name"}}, ["/tls/existingSecret"]),
        ({"networkPolicy": {"extraFrom": [{}]}}, ["/networkPolicy/extraFrom/0"]),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_schema_rejects_bad_values_with_the_path(
    chart: helm.Chart, values: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(values)
    # An install validates the same way before rendering anything.
    with pytest.raises(helm.HelmValuesError) as install_error:
        render(chart, values)
    for error in (schema_error, install_error):
        message = str(error.value)
        for part in expected:
            assert part in message, message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"coordinator": {"replicas": 3}}, "coordinator.replicas=3 needs PostgreSQL"),
        ({"autoscaling": {"enabled": True}}, "autoscaling.enabled needs PostgreSQL"),
        (
            {"database": {"url": EXTERNAL_DATABASE_URL, "existingSecret": "db"}},
            "database.url or database.existingSecret, not both",
        ),
        (
            merged(PRODUCTION, {"autoscaling": {"minReplicas": 5, "maxReplicas": 4}}),
            "autoscaling.minReplicas (5) must not exceed autoscaling.maxReplicas (4)",
        ),
        (
            merged(PRODUCTION, {"coordinator": {"resources": {"requests": {"cpu": None}}}}),
            "needs coordinator.resources.requests.cpu",
        ),
        ({"gateway": {"enabled": False, "ingress": {"enabled": True}}}, "needs gateway.enabled"),
        ({"pdb": {"minAvailable": 1}}, "not both"),
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
        ({"tls": {"clientCA": {"enabled": True}}}, "tls.clientCA.enabled (mutual TLS) needs tls."),
        (
            merged(TLS_ON, {"tls": {"clientCA": {"enabled": True}}}),
            "tls.clientCA.enabled needs tls.clientCA.gatewaySecret",
        ),
        (
            merged(
                merged(TLS_ON, WORKER_ON),
                {"tls": {"clientCA": {"enabled": True, "gatewaySecret": "gw"}}},
            ),
            "tls.clientCA.enabled needs tls.clientCA.workerSecret",
        ),
        (
            {"auth": {"oidc": {"issuer": "https://login.example.com/"}}},
            "auth.oidc.issuer needs auth.oidc.audience and auth.oidc.jwksUrl",
        ),
    ],
)
def test_inconsistent_values_fail_the_render_with_a_message(
    chart: helm.Chart, values: dict[str, Any], expected: str
) -> None:
    chart.validate_schema(values)  # each value is fine on its own
    with pytest.raises(helm.HelmRenderError) as error:
        render(chart, values)
    assert expected in str(error.value)
