"""`cpmgr` as a command: where `run` finds its config, and shell completion in a real bash."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_config import minimal

from cpmgr.cli import DEFAULT_CONFIG, build_parser

REPO = Path(__file__).resolve().parents[1]


def _cpmgr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpmgr", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
        cwd=REPO,
        timeout=60,
    )


def test_the_config_comes_from_cpmgr_config_without_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text(yaml.safe_dump(minimal()), encoding="utf-8")
    result = _cpmgr("check-config", env={"CPMGR_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["groups"][0]["name"] == "orders"


def test_without_flag_or_variable_the_config_is_the_packaged_path() -> None:
    assert DEFAULT_CONFIG == "/etc/cpmgr/cpmgr.yaml"
    for command in ("run", "check-config"):
        args = build_parser().parse_args([command])
        assert args.config == DEFAULT_CONFIG
    help_text = _cpmgr("run", "--help").stdout
    assert "$CPMGR_CONFIG" in help_text and DEFAULT_CONFIG in help_text


def _bash() -> str:
    bash = shutil.which("bash")
    assert bash is not None, "bash is part of every Debian system"
    return bash


def _complete(script: str, words: list[str]) -> list[str]:
    """What bash offers after `words` (the last one being typed), with cpmgr's script loaded."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _cpmgr\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [_bash(), "--norc", "--noprofile"],
        input=program,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


@pytest.fixture(scope="module")
def bash_script() -> str:
    result = _cpmgr("completion", "bash")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bash_completes_subcommands_and_their_options(bash_script: str, tmp_path: Path) -> None:
    assert _complete(bash_script, ["cpmgr", "c"]) == ["check-config", "commit", "completion"]
    assert _complete(bash_script, ["cpmgr", "commit", "--t"]) == ["--timeout"]
    assert _complete(bash_script, ["cpmgr", "get", "--"]) == [
        "--help",
        "--json",
        "--remote",
        "--socket",
    ]
    assert _complete(bash_script, ["cpmgr", "completion", ""]) == ["--help", "-h", "bash", "zsh"]
    # A path option completes file names.
    (tmp_path / "cpmgr.yaml").write_text("", encoding="utf-8")
    typed = str(tmp_path / "cpm")
    assert _complete(bash_script, ["cpmgr", "run", "--config", typed]) == [
        str(tmp_path / "cpmgr.yaml")
    ]


def test_zsh_gets_the_same_script_through_bashcompinit(bash_script: str) -> None:
    result = _cpmgr("completion", "zsh")
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert "bashcompinit" in first
    assert rest == bash_script
