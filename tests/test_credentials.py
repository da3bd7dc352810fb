"""Credentials providers against the emulator's STS, metadata and URI services; the `auto`
choice; the refresher's schedule, its backoff and the never-send-expired rule."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from cpmgr.config import SLSConfig, parse_config
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.errors import SLSError, classify
from cpmgr.metrics import Metrics
from cpmgr.sls.client import SLSClient
from cpmgr.sls.credentials.chain import choose_source
from cpmgr.sls.credentials.ecs import EcsRamRoleProvider
from cpmgr.sls.credentials.keys import CredentialsFetchError, IssuedKeys, Source
from cpmgr.sls.credentials.oidc import OIDCProvider
from cpmgr.sls.credentials.refresher import CredentialsRefresher, RefreshTiming
from cpmgr.sls.credentials.uri import UriProvider
from cpmgr.sls.signer import Credentials

PROJECT, LOGSTORE, GROUP = "proj", "store", "cg"
ROLE_ARN = "acs:ram::1:role/cpmgr"
PROVIDER_ARN = "acs:ram::1:oidc-provider/ack-rrsa-c1"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[EmulatorHandle]:
    token = tmp_path / "token"
    token.write_text("token-one\n")
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:2"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/{GROUP}"],
        sts_lifetime=60,
        oidc_token_file=token,
    ) as handle:
        yield handle


def oidc_provider(emulator: EmulatorHandle, token_file: Path) -> OIDCProvider:
    return OIDCProvider(
        role_arn=ROLE_ARN,
        provider_arn=PROVIDER_ARN,
        token_file=str(token_file),
        session_name="cpmgr-test",
        duration=3600,
        sts_url=emulator.url,
    )


def requests(emulator: EmulatorHandle, api: str) -> dict[str, int]:
    return dict(emulator.state.requests.get(api, {}))


async def commit_with(emulator: EmulatorHandle, creds: Credentials, checkpoint: str) -> None:
    async with SLSClient(endpoint=emulator.url, credentials=lambda: creds) as client:
        await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, 0, checkpoint, consumer="c")


# --------------------------------------------------------------------------- providers


async def test_oidc_keys_are_accepted_by_sls_and_a_rotated_token_file_is_read_again(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    provider = oidc_provider(emulator, tmp_path / "token")
    try:
        keys = await provider.fetch()
        assert keys.credentials.access_key_id.startswith("STS.")
        assert keys.expires_at is not None
        await commit_with(emulator, keys.credentials, "MQ==")

        (tmp_path / "token").write_text("token-two")
        rotated = await provider.fetch()
        assert rotated.credentials != keys.credentials
    finally:
        await provider.close()
    assert requests(emulator, "AssumeRoleWithOIDC") == {"OK": 2}
    assert requests(emulator, "UpdateCheckPoint") == {"OK": 1}


async def test_a_stale_oidc_token_is_refused_and_the_error_holds_no_token(
    emulator: EmulatorHandle, tmp_path: Path
) -> None:
    stale = tmp_path / "stale"
    stale.write_text("token-zero")
    provider = oidc_provider(emulator, stale)
    try:
        with pytest.raises(CredentialsFetchError) as refused:
            await provider.fetch()
    finally:
        await provider.close()
    assert "AuthenticationFail.OIDCToken.Expired" in str(refused.value)
    assert "token-zero" not in str(refused.value)


async def test_sts_takes_the_python_sdks_get_query_too(emulator: EmulatorHandle) -> None:
    query = {
        "Action": "AssumeRoleWithOIDC",
        "Format": "JSON",
        "Version": "2015-04-01",
        "RoleArn": ROLE_ARN,
        "OIDCProviderArn": PROVIDER_ARN,
        "OIDCToken": "token-one",
        "RoleSessionName": "credentials-python-1",
        "DurationSeconds": "3600",
    }
    async with aiohttp.ClientSession() as http, http.get(emulator.url, params=query) as answer:
        document = await answer.json()
    assert answer.status == 200
    assert set(document["Credentials"]) == {
        "AccessKeyId",
        "AccessKeySecret",
        "SecurityToken",
        "Expiration",
    }


async def test_ecs_ram_role_with_and_without_a_role_name(emulator: EmulatorHandle) -> None:
    for role in (None, "cpmgr-emulator-role"):
        provider = EcsRamRoleProvider(metadata_url=emulator.url, role_name=role)
        try:
            keys = await provider.fetch()
        finally:
            await provider.close()
        await commit_with(emulator, keys.credentials, "Mg==")
    wrong = EcsRamRoleProvider(metadata_url=emulator.url, role_name="other")
    try:
        with pytest.raises(CredentialsFetchError, match="HTTP 404"):
            await wrong.fetch()
    finally:
        await wrong.close()
    assert requests(emulator, "MetadataToken") == {"OK": 3}
    assert requests(emulator, "MetadataRoleName") == {"OK": 1}


async def test_uri_keys_and_a_service_that_is_down(emulator: EmulatorHandle) -> None:
    provider = UriProvider(f"{emulator.url}/credentials?role=a")
    try:
        keys = await provider.fetch()
        await commit_with(emulator, keys.credentials, "Mw==")
        emulator.app.credentials.update({"down": True})
        with pytest.raises(CredentialsFetchError, match="HTTP 503"):
            await provider.fetch()
    finally:
        await provider.close()
    assert requests(emulator, "CredentialsURI") == {"OK": 1, "ServiceUnavailable": 1}


async def test_sls_refuses_sts_keys_once_they_expire_or_without_their_token(
    tmp_path: Path,
) -> None:
    clock = Clock(float(int(time.time())))
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:1"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/{GROUP}"],
        sts_lifetime=60,
        wall_clock=clock,
    ) as emulator:
        provider = UriProvider(f"{emulator.url}/credentials")
        try:
            keys = await provider.fetch()
        finally:
            await provider.close()
        assert keys.expires_at == clock.now + 60
        creds = keys.credentials
        with pytest.raises(SLSError) as no_token:
            await commit_with(emulator, replace(creds, security_token=""), "MQ==")
        assert no_token.value.code == "InvalidSecurityToken"
        clock.now += 59
        await commit_with(emulator, creds, "MQ==")
        clock.now += 1
        with pytest.raises(SLSError) as expired:
            await commit_with(emulator, creds, "Mg==")
        assert expired.value.code == "SecurityTokenExpired"
        assert expired.value.credentials_problem


async def test_an_unreachable_service_is_one_clear_error() -> None:
    provider = UriProvider("http://127.0.0.1:1/credentials?secret=s3cr3t")
    try:
        with pytest.raises(CredentialsFetchError) as failed:
            await provider.fetch()
    finally:
        await provider.close()
    assert "127.0.0.1:1" in str(failed.value) and "s3cr3t" not in str(failed.value)


# --------------------------------------------------------------------------- auto


def sls_config(sls: dict[str, Any], env: dict[str, str] | None = None) -> SLSConfig:
    data = {
        "sls": {"endpoint": "http://127.0.0.1:1", **sls},
        "groups": [{"name": "g", "project": "p", "logstore": "l", "consumer_group": "c"}],
    }
    return parse_config(data, env or {}).sls


async def never(_: SLSConfig) -> bool:
    raise AssertionError("the metadata service must not be probed")


async def test_auto_takes_the_sdks_order_with_several_sources_present(tmp_path: Path) -> None:
    creds = tmp_path / "keys.json"
    creds.write_text('{"AccessKeyId": "f", "AccessKeySecret": "s"}')
    oidc_env = {
        "ALIBABA_CLOUD_ROLE_ARN": ROLE_ARN,
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": PROVIDER_ARN,
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE": str(tmp_path / "token"),
        "ALIBABA_CLOUD_CREDENTIALS_URI": "http://127.0.0.1:1/credentials",
    }
    keys_env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "i", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "s"}
    everything = sls_config({"credentials_file": str(creds)}, {**oidc_env, **keys_env})
    assert await choose_source(everything, env={}, probe=never) == "static"
    no_keys = sls_config({"credentials_file": str(creds)}, oidc_env)
    assert await choose_source(no_keys, env={}, probe=never) == "oidc"
    assert await choose_source(sls_config({"credentials_file": str(creds)}), probe=never) == "file"

    uri_only = sls_config({}, {"ALIBABA_CLOUD_CREDENTIALS_URI": "http://127.0.0.1:1/c"})

    async def answers(_: SLSConfig) -> bool:
        return True

    async def silent(_: SLSConfig) -> bool:
        return False

    assert await choose_source(uri_only, env={}, probe=answers) == "ecs_ram_role"
    assert await choose_source(uri_only, env={}, probe=silent) == "uri"
    disabled = {"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
    assert await choose_source(uri_only, env=disabled, probe=never) == "uri"
    with pytest.raises(CredentialsFetchError, match="no credentials found"):
        await choose_source(sls_config({}), env={}, probe=silent)


async def test_auto_probes_a_real_metadata_service(emulator: EmulatorHandle) -> None:
    found = sls_config({"ecs_ram_role": {"metadata_endpoint": emulator.url}})
    assert await choose_source(found, env={}) == "ecs_ram_role"
    closed = sls_config({"ecs_ram_role": {"metadata_endpoint": "http://127.0.0.1:1"}})
    with pytest.raises(CredentialsFetchError):
        await choose_source(closed, env={})


# --------------------------------------------------------------------------- the refresher


class ScriptedProvider:
    """Keys living `life` seconds on the test's clock, or a failure while `failing`."""

    def __init__(self, clock: Clock, life: float) -> None:
        self.clock = clock
        self.life = life
        self.failing = False
        self.fetched = 0
        self.attempted = asyncio.Condition()
        self.attempts = 0

    @property
    def source(self) -> Source:
        return "uri"

    async def fetch(self) -> IssuedKeys:
        async with self.attempted:
            self.attempts += 1
            self.attempted.notify_all()
        if self.failing:
            raise CredentialsFetchError("service down")
        self.fetched += 1
        creds = Credentials(f"STS.{self.fetched}", f"secret-{self.fetched}", "tok")
        return IssuedKeys(creds, self.clock.now + self.life)

    async def close(self) -> None:
        return None

    async def wait_attempts(self, count: int) -> None:
        async with self.attempted:
            await asyncio.wait_for(self.attempted.wait_for(lambda: self.attempts >= count), 5)


def refresher_for(
    provider: ScriptedProvider, clock: Clock, registry: CollectorRegistry
) -> CredentialsRefresher:
    sls = sls_config({"credentials": "uri", "credentials_uri": "http://127.0.0.1:1/c"})
    refresher = CredentialsRefresher(
        sls,
        observer=Metrics(registry, process_metrics=False),
        clock=clock,
        rng=lambda: 0.5,
        timing=RefreshTiming(min_interval=0.01, initial_backoff=0.01, max_backoff=0.02),
    )
    refresher._provider = provider  # the one seam: a scripted source instead of the network
    return refresher


def test_the_schedule_follows_the_contract() -> None:
    timing = RefreshTiming()
    half = 0.0
    # An hour-long key: refreshed 5 minutes before expiry (up to 20% earlier with jitter).
    assert timing.after_success(3600, lambda: half) == 3300
    assert timing.after_success(3600, lambda: 1.0) == 3240
    # A 30-second key: when half its life remains; never sooner than 5 s apart.
    assert timing.after_success(30, lambda: half) == 15
    assert timing.after_success(4, lambda: half) == 5
    delays = [timing.after_failure(n, lambda: 0.999) for n in range(1, 10)]
    assert all(5 <= d <= 30 for d in delays) and delays == sorted(delays)


async def test_keys_within_ten_seconds_of_expiry_are_never_handed_out() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    provider = ScriptedProvider(clock, life=30)
    refresher = refresher_for(provider, clock, registry)
    with pytest.raises(SLSError) as none_yet:
        refresher()
    assert none_yet.value.code == "CredentialsUnavailable"
    await refresher._refresh()
    assert refresher().access_key_id == "STS.1"
    clock.now += 19.9
    assert refresher().access_key_id == "STS.1"
    clock.now += 0.1
    with pytest.raises(SLSError) as expired:
        refresher()
    assert expired.value.code == "CredentialsExpired"
    assert classify(expired.value.code, expired.value.status) == "credentials"
    assert "secret-1" not in str(expired.value) and "tok" not in expired.value.message


async def test_a_failed_refresh_keeps_the_keys_backs_off_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cpmgr")
    clock = Clock()
    registry = CollectorRegistry()
    provider = ScriptedProvider(clock, life=30)
    refresher = refresher_for(provider, clock, registry)
    await refresher.start()
    try:
        provider.failing = True
        refresher.invalidate()  # a refusal from SLS asks for a refresh at once
        await provider.wait_attempts(3)
        assert refresher().access_key_id == "STS.1"  # still valid: still sent
        status = refresher.status()
        assert status["refresh_failures"] and status["valid"] is True
        assert status["last_error"] == "service down"
    finally:
        await refresher.close()
    provider.failing = False
    await refresher._refresh()  # the next attempt, run here instead of on the stopped task
    assert refresher().access_key_id == "STS.2"
    assert refresher.status()["refresh_failures"] == 0
    failures = registry.get_sample_value(
        "cpmgr_credentials_refresh_total", {"source": "uri", "result": "failure"}
    )
    successes = registry.get_sample_value(
        "cpmgr_credentials_refresh_total", {"source": "uri", "result": "success"}
    )
    assert failures is not None and failures >= 2 and successes == 2
    assert "secret-" not in caplog.text
    assert sum("credentials refreshed from uri" in r.message for r in caplog.records) == 2


async def test_a_file_with_an_expiration_is_never_used_past_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        '{"AccessKeyId": "STS.f", "AccessKeySecret": "s", "SecurityToken": "t",'
        ' "Expiration": "2030-01-01T00:00:30Z"}'
    )
    clock = Clock(1893456000.0)  # 2030-01-01T00:00:00Z
    refresher = CredentialsRefresher(
        sls_config({"credentials": "file", "credentials_file": str(keys)}), clock=clock
    )
    assert refresher().access_key_id == "STS.f"
    assert refresher.status()["expires_at"] == "2030-01-01T00:00:30Z"
    clock.now += 20
    with pytest.raises(SLSError) as expired:
        refresher()
    assert expired.value.code == "CredentialsExpired"
    # A rotated file is read before the next request, and its keys are used at once.
    keys.write_text(
        '{"AccessKeyId": "STS.g", "AccessKeySecret": "s2", "SecurityToken": "t2",'
        ' "Expiration": "2030-01-01T01:00:00Z"}'
    )
    refresher.invalidate()
    assert refresher().access_key_id == "STS.g"
