"""The Kubernetes sidecar (deploy/kubernetes, rendered by kustomize with static keys) and the
systemd unit agree with cpmgr's own config."""

from __future__ import annotations

import configparser
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kustomize import documents

from cpmgr.config import Config, load_config, parse_config, parse_duration, split_listen

ROOT = Path(__file__).resolve().parent.parent
STATIC_KEYS = ROOT / "deploy" / "kubernetes" / "overlays" / "static-keys"
UNIT = ROOT / "deploy" / "systemd" / "cpmgr.service"

# What the Deployment provides to the container: the Secret's keys and the downward API.
POD_ENV = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI-example",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "example-secret",
    "POD_NAME": "orders-consumer-7d9f-abcde",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

Manifest = dict[str, Any]


def _documents() -> list[Manifest]:
    return documents(STATIC_KEYS)


def _one(kind: str) -> Manifest:
    found = [doc for doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}"
    return found[0]


@pytest.fixture
def pod() -> Manifest:
    spec: Manifest = _one("Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture
def sidecar(pod: Manifest) -> Manifest:
    # A native sidecar: an init container that keeps running and outlives the app on shutdown.
    (container,) = [c for c in pod.get("initContainers", []) if c["name"] == "cpmgr"]
    assert container["restartPolicy"] == "Always"
    return container


@pytest.fixture
def app(pod: Manifest) -> Manifest:
    (container,) = [c for c in pod["containers"] if c["name"] == "app"]
    return container


@pytest.fixture
def cfg(sidecar: Manifest) -> Config:
    """The embedded cpmgr config, validated by cpmgr itself, at the path the sidecar reads."""
    configmap = _one("ConfigMap")
    config_path = PurePosixPath(sidecar["args"][sidecar["args"].index("--config") + 1])
    text = configmap["data"][config_path.name]
    return parse_config(yaml.safe_load(text), env=POD_ENV)


def _volume(pod: Manifest, name: str) -> Manifest:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return volume


def _mount_of(container: Manifest, path: PurePosixPath) -> Manifest | None:
    """The volume mount holding `path` (the path itself or a parent) in this container."""
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if mount_path == path or mount_path in path.parents:
            return dict(mount)
    return None


def test_config_map_is_mounted_where_read(pod: Manifest, sidecar: Manifest) -> None:
    mount = _mount_of(sidecar, PurePosixPath(sidecar["args"][-1]))
    assert mount is not None and mount["readOnly"] is True
    volume = _volume(pod, mount["name"])
    assert volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]


def test_app_and_sidecar_share_the_socket_directory(
    pod: Manifest, sidecar: Manifest, app: Manifest, cfg: Config
) -> None:
    socket = PurePosixPath(cfg.socket.path)
    sidecar_mount, app_mount = _mount_of(sidecar, socket), _mount_of(app, socket)
    assert sidecar_mount is not None and app_mount is not None
    assert sidecar_mount["name"] == app_mount["name"]
    assert sidecar_mount["mountPath"] == app_mount["mountPath"]
    assert "emptyDir" in _volume(pod, sidecar_mount["name"])
    assert {"name": "CPMGR_SOCKET", "value": str(socket)} in app["env"]
    # The app reaches the 0660 socket through the pod's fsGroup, the sidecar's gid.
    assert cfg.socket.mode & 0o060 == 0o060
    assert pod["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]


def test_probes_and_scraping_reach_http_listen(sidecar: Manifest, cfg: Config) -> None:
    host, port = split_listen(cfg.http.listen)
    assert host not in LOOPBACK_HOSTS, "kubelet probes and Prometheus cannot reach loopback"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, probe
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_covers_the_final_flush(pod: Manifest, cfg: Config) -> None:
    assert pod["terminationGracePeriodSeconds"] > cfg.commit.shutdown_timeout


def test_sidecar_is_locked_down(pod: Manifest, sidecar: Manifest, cfg: Config) -> None:
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # With a read-only root, everything cpmgr writes must be on a volume.
    for writable in (cfg.socket.path, cfg.state.dir):
        if writable is not None:
            mount = _mount_of(sidecar, PurePosixPath(writable))
            assert mount is not None and not mount.get("readOnly", False), writable
            assert "emptyDir" in _volume(pod, mount["name"])


def test_credentials_come_from_a_secret(sidecar: Manifest, cfg: Config) -> None:
    env = {e["name"]: e for e in sidecar["env"]}
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # The config names no key itself: it reads them from that environment.
    assert cfg.sls.access_key_id == POD_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"]
    assert cfg.groups[0].consumer == POD_ENV["POD_NAME"]


# ------------------------------------------------------------------------------- systemd


def _unit() -> configparser.ConfigParser:
    # systemd allows a key twice (SystemCallFilter=); the last value is enough here.
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_runs_reloads_and_drains() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"  # READY=1 once the socket listens
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[1:] == ["run", "--config", "/etc/cpmgr/cpmgr.yaml"]
    assert service["ExecReload"].endswith("kill -HUP $MAINPID")
    assert service["KillSignal"] == "SIGTERM"
    assert service["RuntimeDirectory"] == "cpmgr"
    assert service["User"] != "root"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""


def test_systemd_stop_timeout_covers_the_shipped_shutdown_timeout() -> None:
    example = load_config(
        ROOT / "config" / "cpmgr.example.yaml",
        env={k: v for k, v in POD_ENV.items() if k.startswith("ALIBABA")},
    )
    stop_timeout = parse_duration(_unit()["Service"]["TimeoutStopSec"])
    assert stop_timeout > example.commit.shutdown_timeout
    # The default socket path lies in the RuntimeDirectory systemd creates for the unit.
    assert PurePosixPath(example.socket.path).parent == PurePosixPath("/run/cpmgr")
