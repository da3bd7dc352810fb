"""`cpmgr run` as a real process getting its keys from one platform source at a time (the
emulator's STS, metadata service and credentials URI): it commits, `auto` picks the SDKs'
order, short-lived keys are renewed in the background, and an STS outage holds commits
pending until it ends. No secret or token ever shows in a log line, an answer or a page."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    DaemonProcess,
    child_env,
    cursor,
    daemon_config,
    eventually,
    group,
    remote_key,
    running_daemon,
    short_socket_dir,
    spawn_daemon,
    write_yaml,
)

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError
from cpmgr.emulator import EmulatorHandle, running_emulator

STATIC_ID, STATIC_SECRET = "static-key-id", "static-secret-value"
ROLE_ARN = "acs:ram::1234:role/cpmgr"
PROVIDER_ARN = "acs:ram::1234:oidc-provider/ack-rrsa-c1"
# Under the 30-second keys of the load test, a background refresh happens about every 14 s.
SHORT_LIFETIME = 30
TOKEN_1 = "oidc-token-1-e30.eyJzdWIiOiJjcG1nciJ9.c2ln"
TOKEN_2 = "oidc-token-2-e30.eyJzdWIiOiJyb3RhdGVkIn0.c2ln"


@pytest.fixture
def sock_dir() -> Any:
    with short_socket_dir() as path:
        yield path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "rrsa-token"
    path.write_text(f"{TOKEN_1}\n")
    return path


def start_emulator(token_file: Path, lifetime: float) -> Any:
    return running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:4"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/cg-a"],
        sts_lifetime=lifetime,
        oidc_token_file=token_file,
    )


@pytest.fixture
async def emulator(token_file: Path) -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(token_file, 3600) as handle:
        yield handle


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config_for(
    sock: Path, emulator: EmulatorHandle, sls: dict[str, Any], *, http: str = "", **extra: Any
) -> dict[str, Any]:
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=sls,
        groups=[group("orders", "cg-a")],
        **extra,
    )
    config["http"] = {"listen": http}
    return config


def oidc_settings(emulator: EmulatorHandle, token_file: Path) -> dict[str, Any]:
    return {
        "role_arn": ROLE_ARN,
        "provider_arn": PROVIDER_ARN,
        "token_file": str(token_file),
        "sts_endpoint": emulator.url,
    }


def requests(emulator: EmulatorHandle, api: str) -> dict[str, int]:
    return dict(emulator.state.requests.get(api, {}))


def issued_secrets(emulator: EmulatorHandle, *extra: str) -> list[str]:
    """Every secret and token the emulator handed out, and any other secret named."""
    found = [s for key in emulator.app.credentials.issued.values() for s in (key.secret, key.token)]
    return [*found, *extra]


def assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    assert secrets
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret leaked into: {text[:200]}"


def check_config(path: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cpmgr", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=child_env(env),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


async def page(port: int, path: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as got:
        return await got.text()


async def status_command(sock: Path) -> str:
    """`cpmgr status` as an operator runs it: the human table."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        "status",
        "--socket",
        str(sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out
    return out.decode()


# --------------------------------------------------------------------------- every source


SOURCES = ["static", "static-env", "file", "oidc", "oidc-env", "ecs_ram_role", "uri"]


def source_setup(
    name: str, emulator: EmulatorHandle, token_file: Path, tmp_path: Path
) -> tuple[dict[str, Any], dict[str, str], str, str]:
    """(sls settings, environment, the source status should name, the emulator API used)."""
    if name == "static":
        keys = {"access_key_id": STATIC_ID, "access_key_secret": STATIC_SECRET}
        return {"credentials": "static", **keys}, {}, "static", ""
    if name == "static-env":
        env = {
            "ALIBABA_CLOUD_ACCESS_KEY_ID": STATIC_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": STATIC_SECRET,
        }
        return {}, env, "static", ""
    if name == "file":
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({"AccessKeyId": STATIC_ID, "AccessKeySecret": STATIC_SECRET}))
        return {"credentials": "file", "credentials_file": str(path)}, {}, "file", ""
    if name == "oidc":
        settings = {"credentials": "oidc", "oidc": oidc_settings(emulator, token_file)}
        return settings, {}, "oidc", "AssumeRoleWithOIDC"
    if name == "oidc-env":
        # What ACK's pod identity webhook injects, and nothing in the config.
        env = {
            "ALIBABA_CLOUD_ROLE_ARN": ROLE_ARN,
            "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": PROVIDER_ARN,
            "ALIBABA_CLOUD_OIDC_TOKEN_FILE": str(token_file),
            "ALIBABA_CLOUD_STS_ENDPOINT": emulator.url,
        }
        return {}, env, "oidc", "AssumeRoleWithOIDC"
    if name == "ecs_ram_role":
        settings = {
            "credentials": "ecs_ram_role",
            "ecs_ram_role": {"metadata_endpoint": emulator.url},
        }
        return settings, {}, "ecs_ram_role", "MetadataCredentials"
    env = {"ALIBABA_CLOUD_CREDENTIALS_URI": f"{emulator.url}/credentials?role=cpmgr"}
    return {"credentials": "uri"}, env, "uri", "CredentialsURI"


@pytest.mark.parametrize("name", SOURCES)
async def test_each_source_alone_commits(
    name: str, emulator: EmulatorHandle, token_file: Path, sock_dir: Path, tmp_path: Path
) -> None:
    sls, env, source, api = source_setup(name, emulator, token_file, tmp_path)
    if source in ("static", "file"):
        emulator.app.keys[STATIC_ID] = STATIC_SECRET  # signatures verified
    sock, port = sock_dir / "s", free_port()
    path = write_yaml(
        tmp_path / "cpmgr.yaml", config_for(sock, emulator, sls, http=f"127.0.0.1:{port}")
    )
    checked = check_config(path, env)
    assert f"# credentials: source {source} " in checked
    async with running_daemon(path, env=env) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 1, cursor(7), wait=True)
        status = await client.status()
        pages = [await page(port, "/status"), await page(port, "/metrics")]
    assert emulator.state.snapshot()["checkpoints"] == {remote_key("cg-a", 1): cursor(7)}
    assert requests(emulator, "UpdateCheckPoint") == {"OK": 1}
    assert status["credentials"]["source"] == source
    assert status["credentials"]["valid"] is True
    if api:
        assert requests(emulator, api) == {"OK": 1}
        [issued] = emulator.app.credentials.issued.values()
        assert status["credentials"]["access_key_id"] == issued.key_id
    secrets = issued_secrets(emulator, STATIC_SECRET, TOKEN_1)
    assert_no_secret([daemon.log, json.dumps(status), *pages, checked], secrets)


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (["file", "oidc-env", "ecs", "uri"], "oidc"),
        (["ecs", "uri"], "ecs_ram_role"),
    ],
)
async def test_auto_picks_the_first_source_present_in_the_sdks_order(
    present: list[str],
    expected: str,
    emulator: EmulatorHandle,
    token_file: Path,
    sock_dir: Path,
    tmp_path: Path,
) -> None:
    sls: dict[str, Any] = {"credentials": "auto"}
    env: dict[str, str] = {}
    if "file" in present:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({"AccessKeyId": STATIC_ID, "AccessKeySecret": STATIC_SECRET}))
        sls["credentials_file"] = str(keys)
    if "oidc-env" in present:
        env.update(source_setup("oidc-env", emulator, token_file, tmp_path)[1])
    if "ecs" in present:
        sls["ecs_ram_role"] = {"metadata_endpoint": emulator.url}
    if "uri" in present:
        env.update(source_setup("uri", emulator, token_file, tmp_path)[1])
    sock = sock_dir / "s"
    path = write_yaml(tmp_path / "cpmgr.yaml", config_for(sock, emulator, sls))
    async with running_daemon(path, env=env) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(3), wait=True)
        status = await client.status()
    assert status["credentials"]["source"] == expected
    assert status["credentials"]["chosen_by"] == "auto"
    used = {api for api in ("AssumeRoleWithOIDC", "MetadataCredentials", "CredentialsURI")}
    fetched = {api for api in used if requests(emulator, api)}
    assert fetched == {"AssumeRoleWithOIDC" if expected == "oidc" else "MetadataCredentials"}
    assert f"credentials {expected} (chosen by auto)" in daemon.log


async def test_a_reload_switches_from_static_keys_to_oidc(
    emulator: EmulatorHandle, token_file: Path, sock_dir: Path, tmp_path: Path
) -> None:
    emulator.app.keys[STATIC_ID] = STATIC_SECRET
    sock = sock_dir / "s"
    keys = {"access_key_id": STATIC_ID, "access_key_secret": STATIC_SECRET}
    path = write_yaml(tmp_path / "cpmgr.yaml", config_for(sock, emulator, keys))
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(1), wait=True)
        assert (await client.status())["credentials"]["source"] == "static"

        # The keys leave the config, RRSA's settings arrive: `auto` now finds OIDC.
        del emulator.app.keys[STATIC_ID]  # the old keys no longer work at SLS
        oidc = {"oidc": oidc_settings(emulator, token_file)}
        write_yaml(path, config_for(sock, emulator, oidc))
        daemon.send(signal.SIGHUP)
        await daemon.wait_for_line("credentials refreshed from oidc", timeout=30)
        await client.commit("orders", 0, cursor(2), wait=True)
        status = await client.status()
    assert status["credentials"]["source"] == "oidc"
    assert status["credentials"]["chosen_by"] == "auto"
    assert requests(emulator, "AssumeRoleWithOIDC") == {"OK": 1}
    assert requests(emulator, "UpdateCheckPoint") == {"OK": 2}
    assert_no_secret([daemon.log], issued_secrets(emulator, STATIC_SECRET, TOKEN_1))


async def test_auto_with_no_source_at_all_does_not_start(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    path = write_yaml(tmp_path / "cpmgr.yaml", config_for(sock_dir / "s", emulator, {}))
    env = {"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
    daemon = DaemonProcess(await spawn_daemon(path, env))
    try:
        assert await daemon.exit_code(timeout=30) == 1
    finally:
        await daemon.kill()
    [line] = [line for line in daemon.lines if "cannot start" in line]
    assert "no credentials found" in line and "ALIBABA_CLOUD_ROLE_ARN" in line
    assert "Traceback" not in daemon.log


# --------------------------------------------------------------------------- refresh under load


LOAD_SECONDS = 70  # more than twice the keys' 30 s life


async def commit_load(client: AsyncCpmgrClient, seconds: float, on_half_way: Any) -> int:
    """Commit with `wait` on four shards in turn for `seconds`; how many were committed."""
    deadline = time.monotonic() + seconds
    half_way = time.monotonic() + seconds / 2
    number = 0
    while time.monotonic() < deadline:
        number += 1
        await client.commit("orders", number % 4, cursor(number), wait=True)
        if half_way and time.monotonic() >= half_way:
            on_half_way()
            half_way = 0.0
        await asyncio.sleep(0.05)  # a steady trickle, not a flood: this test is about time
    return number


async def test_short_lived_keys_are_renewed_in_the_background_under_load(
    token_file: Path, sock_dir: Path, tmp_path: Path
) -> None:
    """Keys live 30 s; 70 s of commits cross the first keys' expiry twice and about four
    refreshes (about every 14 s), the token file is rotated half-way: no attempt ever fails."""
    async with start_emulator(token_file, SHORT_LIFETIME) as emulator:
        sock = sock_dir / "s"
        sls = {"credentials": "oidc", "oidc": oidc_settings(emulator, token_file)}
        path = write_yaml(tmp_path / "cpmgr.yaml", config_for(sock, emulator, sls, max_attempts=1))

        rotated_at: list[int] = []

        def rotate() -> None:
            # The emulator checks against this same file: from now on the old token is refused.
            rotated_at.append(len(emulator.app.credentials.issued))
            # Atomically, as the kubelet swaps a projected token: never half a file.
            scratch = token_file.with_name("rrsa-token.new")
            scratch.write_text(f"{TOKEN_2}\n")
            os.replace(scratch, token_file)

        async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
            committed = await commit_load(client, LOAD_SECONDS, rotate)
            issued_before_rotation = rotated_at[0]
            status = await client.status()
    assert requests(emulator, "UpdateCheckPoint") == {"OK": committed}
    assert requests(emulator, "AssumeRoleWithOIDC") == {"OK": len(emulator.app.credentials.issued)}
    issued = len(emulator.app.credentials.issued)
    assert issued >= 4, "at least three background refreshes within 70 s"
    assert issued > issued_before_rotation, "a refresh after the rotation, with the new token"
    assert daemon.log.count("credentials refreshed from oidc") == issued
    assert status["credentials"]["refresh_failures"] == 0
    secrets = issued_secrets(emulator, TOKEN_1, TOKEN_2)
    assert_no_secret([daemon.log, json.dumps(status)], secrets)


async def test_an_sts_outage_holds_commits_pending_until_it_ends(
    token_file: Path, sock_dir: Path, tmp_path: Path
) -> None:
    async with start_emulator(token_file, SHORT_LIFETIME) as emulator:
        sock, port = sock_dir / "s", free_port()
        sls = {"credentials": "oidc", "oidc": oidc_settings(emulator, token_file)}
        config = config_for(sock, emulator, sls, http=f"127.0.0.1:{port}", interval="1s")
        path = write_yaml(tmp_path / "cpmgr.yaml", config)
        async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
            await client.commit("orders", 0, cursor(1), wait=True)
            emulator.app.credentials.update({"down": True})

            # The current keys go on serving until 10 s before they expire...
            await daemon.wait_for_line("credentials refresh from oidc failed", timeout=30)
            await client.commit("orders", 0, cursor(2), wait=True)
            [key] = emulator.app.credentials.issued.values()
            # ...then commits stay pending, and say why.
            await eventually(
                lambda: time.time() >= key.expires_at - 10, what="keys near expiry", timeout=30
            )
            with pytest.raises(CpmgrProtocolError) as held:
                await client.commit("orders", 0, cursor(3), wait=True)
            assert held.value.code == "CredentialsExpired" and held.value.dropped is False
            [shard] = await client.get("orders", 0)
            assert shard["pending"] == cursor(3)
            status = await client.status()
            assert status["credentials"]["valid"] is False
            assert "ServiceUnavailable" in status["credentials"]["last_error"]
            human = await status_command(sock)
            assert "credentials: oidc (config)" in human and "NOT usable" in human
            metrics = await page(port, "/metrics")
            assert 'cpmgr_credentials_refresh_total{result="failure",source="oidc"}' in metrics
            pages = [metrics, await page(port, "/status"), json.dumps(status), human]

            # STS comes back: the next retry gets keys and the pending value is committed.
            emulator.app.credentials.update({"down": False})
            await eventually(
                lambda: (
                    emulator.state.snapshot()["checkpoints"].get(remote_key("cg-a", 0)) == cursor(3)
                ),
                what="the held checkpoint committed after the outage",
                daemon=daemon,
                timeout=45,
            )
            recovered = await client.status()
    assert recovered["credentials"]["valid"] is True
    # Expired keys were never sent: SLS saw no SecurityTokenExpired, only successes.
    assert requests(emulator, "UpdateCheckPoint") == {"OK": 3}
    assert requests(emulator, "AssumeRoleWithOIDC")["ServiceUnavailable"] >= 1
    secrets = issued_secrets(emulator, TOKEN_1)
    assert_no_secret([daemon.log, *pages, json.dumps(recovered)], secrets)
