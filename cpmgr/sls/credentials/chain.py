"""Which source a config means: `auto` picks the first one present, in the order of Alibaba
Cloud's credential SDKs (without their CLI and INI profiles): keys, OIDC, a credentials file,
the ECS RAM role (if a metadata service answers), a credentials URI."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

from cpmgr.config import SLSConfig, with_scheme
from cpmgr.sls.credentials.ecs import EcsRamRoleProvider
from cpmgr.sls.credentials.file import FileProvider, load_credentials_file
from cpmgr.sls.credentials.keys import CredentialsFetchError, Provider, Source
from cpmgr.sls.credentials.oidc import OIDCProvider
from cpmgr.sls.credentials.static import StaticProvider
from cpmgr.sls.credentials.uri import UriProvider

ENV_ECS_METADATA_DISABLED = "ALIBABA_CLOUD_ECS_METADATA_DISABLED"

PROBE_TIMEOUT = 1.0

MetadataProbe = Callable[[SLSConfig], Awaitable[bool]]


def present_without_probe(sls: SLSConfig) -> Source | None:
    """The first source found by presence alone (everything before the metadata service)."""
    if sls.has_static_keys:
        return "static"
    if sls.oidc.complete:
        return "oidc"
    if sls.credentials_file:
        return "file"
    return None


async def probe_metadata(sls: SLSConfig) -> bool:
    """Whether a metadata service answers with a RAM role within a second."""
    provider = ecs_provider(sls)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await provider.answers()
    except TimeoutError:
        return False
    finally:
        await provider.close()


async def choose_source(
    sls: SLSConfig,
    *,
    env: Mapping[str, str] | None = None,
    probe: MetadataProbe = probe_metadata,
) -> Source:
    """The source `sls.credentials` names, or for `auto` the first one present."""
    if sls.credentials != "auto":
        return sls.credentials
    env = os.environ if env is None else env
    found = present_without_probe(sls)
    if found is not None:
        return found
    if env.get(ENV_ECS_METADATA_DISABLED, "").lower() != "true" and await probe(sls):
        return "ecs_ram_role"
    if sls.credentials_uri:
        return "uri"
    raise CredentialsFetchError(
        "no credentials found: no keys in sls.access_key_id/ALIBABA_CLOUD_ACCESS_KEY_ID, no "
        "OIDC role (sls.oidc or ALIBABA_CLOUD_ROLE_ARN, ALIBABA_CLOUD_OIDC_PROVIDER_ARN, "
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE), no sls.credentials_file, no metadata service with a "
        "RAM role, no sls.credentials_uri/ALIBABA_CLOUD_CREDENTIALS_URI"
    )


def describe_for_check(sls: SLSConfig, env: Mapping[str, str] | None = None) -> str:
    """`check-config`'s credentials line: the source and what can be known without fetching
    keys (never a secret). Only `auto` may contact anything: the one-second metadata probe."""
    try:
        source = asyncio.run(choose_source(sls, env=env))
    except CredentialsFetchError as exc:
        return f"# credentials: {exc}\n"
    how = "chosen by auto" if sls.credentials == "auto" else "sls.credentials"
    return f"# credentials: source {source} ({how}), {_offline_detail(source, sls)}\n"


def _offline_detail(source: Source, sls: SLSConfig) -> str:
    if source == "static":
        return f"key id {sls.access_key_id}, no expiry"
    if source == "file":
        assert sls.credentials_file
        try:
            keys = load_credentials_file(sls.credentials_file)
        except CredentialsFetchError as exc:
            return f"unusable now: {exc}"
        expiry = f"expire at {keys.expiration_text}" if keys.expires_at else "no expiry"
        return f"key id {keys.credentials.access_key_id}, {expiry}"
    provider = build_provider(source, sls)
    where = {
        "oidc": lambda: f"from STS at {with_scheme(sls.oidc.sts_endpoint)}",
        "ecs_ram_role": lambda: f"from the metadata service at {ecs_provider(sls).metadata_url}",
        "uri": lambda: f"from {cast(UriProvider, provider).host}",
    }[source]()
    return f"keys are fetched at run time {where}"


def build_provider(source: Source, sls: SLSConfig) -> Provider:
    """The provider for `source` from the config (validated: what it needs is there)."""
    if source == "static":
        return StaticProvider(sls.static_credentials)
    if source == "file":
        assert sls.credentials_file
        return FileProvider(sls.credentials_file)
    if source == "oidc":
        oidc = sls.oidc
        assert oidc.role_arn and oidc.provider_arn and oidc.token_file
        return OIDCProvider(
            role_arn=oidc.role_arn,
            provider_arn=oidc.provider_arn,
            token_file=oidc.token_file,
            session_name=oidc.session_name,
            duration=oidc.duration,
            sts_url=with_scheme(oidc.sts_endpoint),
        )
    if source == "ecs_ram_role":
        return ecs_provider(sls)
    assert sls.credentials_uri
    return UriProvider(with_scheme(sls.credentials_uri))


def ecs_provider(sls: SLSConfig) -> EcsRamRoleProvider:
    # Plain http on its link-local address by design: the metadata service offers no TLS.
    url = with_scheme(sls.ecs_ram_role.metadata_endpoint, "http")
    return EcsRamRoleProvider(metadata_url=url, role_name=sls.ecs_ram_role.role_name)
