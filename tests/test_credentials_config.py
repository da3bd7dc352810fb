"""`sls.credentials` and its sources in the config: the webhook's variables, the STS endpoint
the SDKs would use, what each named source needs, plain http, and check-config's line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpmgr.config import SLSConfig, parse_config
from cpmgr.errors import ConfigError

VPC_ENABLED = "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED"
REPO = Path(__file__).resolve().parent.parent
RRSA_ENV = {
    "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1:role/cpmgr",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1:oidc-provider/ack-rrsa-c1",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens/token",
}


def data(**sls: Any) -> dict[str, Any]:
    return {
        "sls": {"endpoint": "cn-hangzhou.log.aliyuncs.com", **sls},
        "groups": [{"name": "g", "project": "p", "logstore": "l", "consumer_group": "c"}],
    }


def sls_of(env: dict[str, str] | None = None, **sls: Any) -> SLSConfig:
    return parse_config(data(**sls), env or {}).sls


def problems_of(env: dict[str, str] | None = None, **sls: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data(**sls), env or {})
    return info.value.problems


def test_the_webhooks_variables_fill_the_oidc_settings() -> None:
    sls = sls_of({**RRSA_ENV, "ALIBABA_CLOUD_ROLE_SESSION_NAME": "pod-a"})
    assert sls.credentials == "auto" and sls.oidc.complete
    assert sls.oidc.role_arn == RRSA_ENV["ALIBABA_CLOUD_ROLE_ARN"]
    assert sls.oidc.session_name == "pod-a" and sls.oidc.duration == 3600
    assert sls.oidc.sts_endpoint == "sts.aliyuncs.com"
    # The config wins over the environment, setting by setting.
    mine = sls_of(RRSA_ENV, oidc={"role_arn": "acs:ram::2:role/other"})
    assert mine.oidc.role_arn == "acs:ram::2:role/other"
    assert mine.oidc.token_file == RRSA_ENV["ALIBABA_CLOUD_OIDC_TOKEN_FILE"]


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, "sts.aliyuncs.com"),
        ({"ALIBABA_CLOUD_STS_REGION": "cn-shanghai"}, "sts.cn-shanghai.aliyuncs.com"),
        (
            {
                "ALIBABA_CLOUD_STS_REGION": "cn-shanghai",
                "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED": "true",
            },
            "sts-vpc.cn-shanghai.aliyuncs.com",
        ),
        (
            {"ALIBABA_CLOUD_STS_ENDPOINT": "sts-vpc.cn-beijing.aliyuncs.com"},
            "sts-vpc.cn-beijing.aliyuncs.com",
        ),
    ],
)
def test_the_sts_endpoint_follows_the_webhook_then_the_sdks(
    env: dict[str, str], endpoint: str
) -> None:
    assert sls_of(env).oidc.sts_endpoint == endpoint
    assert sls_of(env, oidc={"sts_endpoint": "sts.example.com"}).oidc.sts_endpoint == (
        "sts.example.com"
    )


def test_the_metadata_and_uri_settings_come_from_the_environment() -> None:
    env = {"ALIBABA_CLOUD_ECS_METADATA": "my-role", "ALIBABA_CLOUD_CREDENTIALS_URI": "https://c/x"}
    sls = sls_of(env)
    assert sls.ecs_ram_role.role_name == "my-role"
    assert sls.ecs_ram_role.metadata_endpoint == "http://100.100.100.200"
    assert sls.credentials_uri == "https://c/x"


def test_a_named_source_needs_its_settings() -> None:
    assert problems_of(credentials="oidc") == [
        "sls.oidc.role_arn: required with credentials: oidc (or set ALIBABA_CLOUD_ROLE_ARN)",
        "sls.oidc.provider_arn: required with credentials: oidc "
        "(or set ALIBABA_CLOUD_OIDC_PROVIDER_ARN)",
        "sls.oidc.token_file: required with credentials: oidc "
        "(or set ALIBABA_CLOUD_OIDC_TOKEN_FILE)",
    ]
    assert problems_of(credentials="uri") == [
        "sls.credentials_uri: required with credentials: uri (or set ALIBABA_CLOUD_CREDENTIALS_URI)"
    ]
    assert problems_of(credentials="file") == [
        "sls.credentials_file: required with credentials: file"
    ]
    assert problems_of(credentials="vault") == [
        "sls.credentials: must be one of auto, static, file, oidc, ecs_ram_role, uri"
    ]
    # The metadata service needs nothing: it names the instance's role itself.
    assert sls_of(credentials="ecs_ram_role").credentials == "ecs_ram_role"


def test_bad_values_are_named_by_their_path() -> None:
    assert problems_of(oidc={"duration": "5m"}) == [
        "sls.oidc.duration: must be between 900s and 43200s (STS refuses others)"
    ]
    assert problems_of(oidc={"colour": 1}) == ["sls.oidc.colour: unknown key"]
    assert problems_of(ecs_ram_role={"metadata_endpoint": "ftp://x"}) == [
        "sls.ecs_ram_role.metadata_endpoint: scheme must be http or https"
    ]
    assert problems_of(credentials_uri="https://host:0/x") == [
        "sls.credentials_uri: must be a URL like https://host[:port]/path"
    ]


def test_plain_http_to_a_credentials_service_needs_loopback_or_the_opt_in() -> None:
    insecure = {
        "oidc": {"sts_endpoint": "http://sts.example.com"},
        "credentials_uri": "http://creds.example.com/keys",
    }
    assert problems_of(**insecure) == [
        "sls.oidc.sts_endpoint: http:// to a host other than loopback sends credentials in "
        "clear text; use https, or set sls.allow_insecure_http: true",
        "sls.credentials_uri: http:// to a host other than loopback receives credentials in "
        "clear text; use https, or set sls.allow_insecure_http: true",
    ]
    assert sls_of(**insecure, allow_insecure_http=True).credentials_uri
    assert sls_of(oidc={"sts_endpoint": "http://127.0.0.1:9"}, credentials_uri="http://[::1]/c")
    # The metadata service is plain http on its link-local address by design.
    assert sls_of(ecs_ram_role={"metadata_endpoint": "http://100.100.100.200"})


def check_config(tmp_path: Path, env: dict[str, str], **sls: Any) -> tuple[str, dict[str, Any]]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data(**sls)))
    result = subprocess.run(
        [sys.executable, "-m", "cpmgr", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0], yaml.safe_load(result.stdout)


def test_check_config_says_where_keys_will_come_from(tmp_path: Path) -> None:
    env = {**RRSA_ENV, "ALIBABA_CLOUD_STS_REGION": "cn-hangzhou"}
    env[VPC_ENABLED] = "true"
    line, effective = check_config(tmp_path, env)
    assert line == (
        "# credentials: source oidc (chosen by auto), keys are fetched at run time from STS "
        "at https://sts-vpc.cn-hangzhou.aliyuncs.com"
    )
    assert effective["sls"]["credentials"] == "auto"
    assert effective["sls"]["oidc"]["token_file"] == RRSA_ENV["ALIBABA_CLOUD_OIDC_TOKEN_FILE"]

    keys = tmp_path / "keys.json"
    keys.write_text(
        '{"AccessKeyId": "STS.file", "AccessKeySecret": "file-secret", "SecurityToken": "tok",'
        ' "Expiration": "2030-01-02T03:04:05Z"}'
    )
    line, _ = check_config(tmp_path, {}, credentials_file=str(keys))
    assert line == (
        "# credentials: source file (chosen by auto), key id STS.file, "
        "expire at 2030-01-02T03:04:05Z"
    )
    uri = {"ALIBABA_CLOUD_CREDENTIALS_URI": "https://creds.example.com/v1/keys?token=s3cr3t"}
    line, effective = check_config(tmp_path, uri, credentials="uri")
    assert line == (
        "# credentials: source uri (sls.credentials), keys are fetched at run time from "
        "https://creds.example.com"
    )
    assert effective["sls"]["credentials_uri"] == "https://creds.example.com/v1/keys?***"

    nothing = {"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
    line, _ = check_config(tmp_path, nothing)
    assert line.startswith("# credentials: no credentials found: ")
