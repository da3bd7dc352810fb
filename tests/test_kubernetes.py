"""deploy/kubernetes rendered by kustomize itself, every manifest validated against the
Kubernetes schema and the PodMonitor CRD (both vendored in tests/data/schemas), and what each
overlay promises: static keys from a Secret, RRSA with no key at all."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kustomize import documents

from cpmgr.config import Config, parse_config, split_listen
from cpmgr.sls.credentials.chain import present_without_probe

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
STATIC_KEYS = KUBERNETES / "overlays" / "static-keys"
RRSA = KUBERNETES / "overlays" / "rrsa"
SCHEMAS = ROOT / "tests" / "data" / "schemas"
# What the ack-pod-identity-webhook injects into an RRSA pod.
RRSA_ENV = {
    "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1234567890:role/cpmgr-orders-checkpoints",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1234567890:oidc-provider/ack-rrsa-c123",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens/token",
    "POD_NAME": "orders-consumer-7d9f-abcde",
}

Manifest = dict[str, Any]


@cache
def _kubernetes_schemas() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (SCHEMAS / "kubernetes-v1.30-strict.json").read_text(encoding="utf-8")
    )
    return loaded


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: an object with
    declared properties takes no other field (the server prunes or, with
    --validate=strict, rejects it), unless it says x-kubernetes-preserve-unknown-fields.
    CRD schemas never say additionalProperties: false themselves, so it is added here."""
    if isinstance(schema, dict):
        strict = {key: _strict(value) for key, value in schema.items()}
        preserves = schema.get("x-kubernetes-preserve-unknown-fields") is True
        if "properties" in schema and "additionalProperties" not in schema and not preserves:
            strict["additionalProperties"] = False
        return strict
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _local_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """The package names Kubernetes' own types as `<definition>#` (metadata is an ObjectMeta):
    point those at the vendored Kubernetes schema's definitions."""
    if isinstance(schema, dict):
        local = {key: _local_refs(value, defs) for key, value in schema.items()}
        if "$ref" in schema:
            name = schema["$ref"].removesuffix("#")
            assert name in defs, f"no vendored Kubernetes definition for {name}"
            local["$ref"] = f"#/$defs/{name}"
        return local
    if isinstance(schema, list):
        return [_local_refs(item, defs) for item in schema]
    return schema


@cache
def _podmonitor_schema() -> dict[str, Any]:
    """The prometheus-operator PodMonitor CRD's schema (tests/data/schemas/README.md)."""
    path = SCHEMAS / "podmonitor-monitoring.coreos.com-v1.json"
    defs = _kubernetes_schemas()["$defs"]
    crd = _strict(json.loads(path.read_text(encoding="utf-8")))
    return {**_local_refs(crd, defs), "$defs": defs}


def _schema_for(manifest: Manifest) -> dict[str, Any]:
    key = f"{manifest['apiVersion']}/{manifest['kind']}"
    if key == "monitoring.coreos.com/v1/PodMonitor":
        return _podmonitor_schema()
    schemas = _kubernetes_schemas()
    assert key in schemas["kinds"], f"no vendored schema for {key}"
    return {**schemas["kinds"][key], "$defs": schemas["$defs"]}


def _problems(manifest: Manifest) -> list[str]:
    try:
        import jsonschema  # noqa: PLC0415 (a test extra added with these tests)
    except ImportError:
        pytest.fail("jsonschema is missing: `make venv` installs the test extras", pytrace=False)
    validator = jsonschema.Draft202012Validator(_schema_for(manifest))
    name = f"{manifest['kind']}/{manifest['metadata']['name']}"
    return [
        f"{name}: {'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("directory", [BASE, STATIC_KEYS, RRSA], ids=lambda p: p.name)
def test_every_rendered_manifest_is_valid(directory: Path) -> None:
    rendered = documents(directory)
    assert {m["kind"] for m in rendered} >= {
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodMonitor",
        "ServiceAccount",
    }
    assert [problem for manifest in rendered for problem in _problems(manifest)] == []


def test_the_schemas_catch_a_misspelt_field() -> None:
    """The validation is strict: a typo is an error, not an ignored field."""
    (deployment,) = [m for m in documents(STATIC_KEYS) if m["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartpolicy"] = "Always"
    assert any("restartpolicy" in p for p in _problems(deployment))
    (monitor,) = [m for m in documents(STATIC_KEYS) if m["kind"] == "PodMonitor"]
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in p for p in _problems(monitor))


def _podmonitor(directory: Path = STATIC_KEYS) -> Manifest:
    (monitor,) = [m for m in documents(directory) if m["kind"] == "PodMonitor"]
    return monitor


def test_the_podmonitor_crd_schema_rejects_what_the_operator_would() -> None:
    """Validated against the operator's own CRD schema, not a copy of what the manifest uses."""
    monitor = _podmonitor()
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    problems = _problems(monitor)
    assert any("podMetricsEndpoint'" in p and "unexpected" in p for p in problems), problems
    assert any("'podMetricsEndpoints' is a required property" in p for p in problems), problems

    monitor = _podmonitor()
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 30  # a Duration is a string
    assert any(
        p.endswith("podMetricsEndpoints/0/interval: 30 is not of type 'string'")
        for p in _problems(monitor)
    ), _problems(monitor)

    monitor = _podmonitor()
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert any(
        "podMetricsEndpoints/0/interval" in p and "does not match" in p for p in _problems(monitor)
    )

    monitor = _podmonitor()
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    assert any("relabelings/0/action" in p for p in _problems(monitor))

    monitor = _podmonitor()
    monitor["metadata"]["labels"] = {"team": 7}  # metadata is Kubernetes' ObjectMeta
    assert _problems(monitor) == [
        f"PodMonitor/{monitor['metadata']['name']}: metadata: {monitor['metadata']} "
        "is not valid under any of the given schemas"  # an ObjectMeta, or null
    ]


def _one(rendered: list[Manifest], kind: str) -> Manifest:
    found = [m for m in rendered if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}"
    return found[0]


def _sidecar(rendered: list[Manifest]) -> Manifest:
    pod = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["initContainers"] if c["name"] == "cpmgr"]
    assert container["restartPolicy"] == "Always"  # the native sidecar
    return dict(container)


def _config(rendered: list[Manifest], env: dict[str, str]) -> Config:
    text = _one(rendered, "ConfigMap")["data"]["cpmgr.yaml"]
    return parse_config(yaml.safe_load(text), env=env)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("directory", [STATIC_KEYS, RRSA], ids=lambda p: p.name)
def test_pod_monitor_scrapes_the_sidecar_port_as_job_cpmgr(directory: Path) -> None:
    rendered = documents(directory)
    pod_labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    monitor = _one(rendered, "PodMonitor")["spec"]
    assert _selects(monitor["selector"], pod_labels)
    (endpoint,) = monitor["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in _sidecar(rendered)["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in ports
    # deploy/prometheus/alerts.yml selects job="cpmgr".
    assert {"targetLabel": "job", "replacement": "cpmgr"} in endpoint["relabelings"]


@pytest.mark.parametrize("directory", [STATIC_KEYS, RRSA], ids=lambda p: p.name)
def test_network_policy_admits_only_the_scraper_to_the_metrics_port(directory: Path) -> None:
    rendered = documents(directory)
    pod_labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = _one(rendered, "NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]  # everything else in is denied
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    # Both selectors in one entry: Prometheus' pods in the monitoring namespace (two entries
    # would admit every pod of that namespace, or every such pod in any namespace).
    assert source["namespaceSelector"]["matchLabels"]
    assert source["podSelector"]["matchLabels"]
    cpmgr_yaml = yaml.safe_load(_one(rendered, "ConfigMap")["data"]["cpmgr.yaml"])
    _, metrics_port = split_listen(cpmgr_yaml["http"]["listen"])
    assert rule["ports"] == [{"port": metrics_port, "protocol": "TCP"}]


def test_static_keys_come_from_the_secret() -> None:
    rendered = documents(STATIC_KEYS)
    secret = _one(rendered, "Secret")
    env = {e["name"]: e for e in _sidecar(rendered)["env"]}
    for name, key in (
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "access-key-id"),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "access-key-secret"),
    ):
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["stringData"]


def test_rrsa_has_no_key_and_the_service_account_names_the_role() -> None:
    rendered = documents(RRSA)
    assert [m for m in rendered if m["kind"] == "Secret"] == []
    pod = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    account = _one(rendered, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["pod-identity.alibabacloud.com/role-name"]
    names = {e["name"] for c in pod["initContainers"] + pod["containers"] for e in c.get("env", [])}
    assert not any(name.startswith("ALIBABA_CLOUD_ACCESS_KEY") for name in names)
    text = _one(rendered, "ConfigMap")["data"]["cpmgr.yaml"]
    assert yaml.safe_load(text)["sls"]["credentials"] == "oidc"
    assert "access_key" not in text
    # cpmgr itself accepts the config with what the webhook injects, and nothing else.
    cfg = _config(rendered, RRSA_ENV)
    assert cfg.sls.credentials == "oidc"
    assert cfg.sls.oidc.role_arn == RRSA_ENV["ALIBABA_CLOUD_ROLE_ARN"]
    assert cfg.sls.oidc.token_file == RRSA_ENV["ALIBABA_CLOUD_OIDC_TOKEN_FILE"]
    assert present_without_probe(cfg.sls) == "oidc"  # auto would pick it too
    assert cfg.groups[0].consumer == RRSA_ENV["POD_NAME"]
