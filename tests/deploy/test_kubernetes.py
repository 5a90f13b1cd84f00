"""Static checks of the Kubernetes manifests (``ops/kubernetes``), run without a cluster.

Every resource is validated against the Kubernetes API's JSON schemas in strict mode
(unknown fields fail) with the PyPI package ``kubernetes-validate``, for the oldest
Kubernetes release the manifests support and the newest the package knows. The rules a
schema cannot express are checked here too: probes on each role's health port, hardened
pods, autoscalers and budgets that target real Deployments, a kustomization that lists
every file, settings that load for each pod's role, and the image of compose and the
Dockerfile. With ``kubectl`` on the machine, the kustomizations are also rendered (its
absence skips only that test: CI does not need kubectl).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

from eventsched.core.runtime import settings as config
from eventsched.core.runtime.sections import ApiToken
from eventsched.plugins.api.auth import check_api_settings, is_loopback
from tests.support.proc import REPO as ROOT

KUBERNETES = ROOT / "ops" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = sorted(path.parent for path in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]

# The oldest Kubernetes release the manifests support (docs/deployment.md) and the newest
# whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")

ROLES = ("consumer", "executor", "api")
# docs/deployment.md applies everything but the roles first, waits for the Jobs, then the rest.
SETUP_SELECTOR = "app.kubernetes.io/component notin (consumer,executor,api)"
SETUP_COMMANDS = {"migrate": ["migrate", "up"], "topics": ["topics", "ensure"]}
# The keys of the Secret `eventsched` that the operator creates (docs/deployment.md).
SECRET_NAME = "eventsched"
SECRET_KEYS = {"postgres-dsn", "redis-url", "api-token"}
SAMPLE_SECRETS = {
    "postgres-dsn": "postgresql://eventsched:secret@postgres:5432/eventsched",
    "redis-url": "redis://redis:6379/0",
}


# --------------------------------------------------------------------- helpers


def kustomization(directory: Path) -> dict[str, Any]:
    loaded = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def listed_resources(directory: Path) -> Iterator[dict[str, Any]]:
    """The resources of the kustomization's own files (not those of a base it includes)."""
    for entry in kustomization(directory).get("resources", []):
        path = directory / entry
        if path.is_dir():
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                yield doc


def generated_configmaps(directory: Path) -> Iterator[dict[str, Any]]:
    """The ConfigMaps a configMapGenerator of files produces (without the name's hash)."""
    for generator in kustomization(directory).get("configMapGenerator", []):
        data = {
            Path(name).name: (directory / name).read_text(encoding="utf-8")
            for name in generator.get("files", [])
        }
        yield {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"]},
            "data": data,
        }


def base_resources() -> list[dict[str, Any]]:
    return list(listed_resources(BASE))


def of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def pod_templates(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``Kind/name`` -> pod template of every Deployment and Job."""
    return {
        f"{r['kind']}/{r['metadata']['name']}": r["spec"]["template"]
        for r in resources
        if r["kind"] in ("Deployment", "Job")
    }


def role_of(container: dict[str, Any]) -> str:
    args = container["args"]
    return str(args[args.index("--role") + 1])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, Secret references filled with sample values."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET_NAME, item
        env[item["name"]] = SAMPLE_SECRETS[ref["key"]]
    return env


def settings_files(directory: Path) -> dict[str, Path]:
    """ConfigMap key -> file of the settings generator of a kustomization."""
    (generator,) = [
        g for g in kustomization(directory)["configMapGenerator"] if g["name"] == SETTINGS_MAP
    ]
    return {Path(name).name: directory / name for name in generator["files"]}


SETTINGS_MAP = "eventsched-settings"


def pod_settings(
    template: dict[str, Any], container: dict[str, Any], settings_dir: Path
) -> config.Settings:
    """What the container's process loads: the image's settings file, ``--settings``
    (resolved to the ConfigMap key it is mounted from) and the environment."""
    args = container["args"]
    mounted = Path(args[args.index("--settings") + 1])
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == mounted.parent]
    assert volumes[mount["name"]]["configMap"]["name"] == SETTINGS_MAP
    extra = settings_files(settings_dir)[mounted.name]
    return config.load_settings(
        extra,
        environ=container_env(container),
        settings_file=ROOT / "config" / "settings.toml",
    )


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$")
_FACTORS = {None: 1.0, "m": 0.001, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"unexpected quantity {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


# ---------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "directory", [pytest.param(d, id=d.relative_to(KUBERNETES).as_posix()) for d in KUSTOMIZATIONS]
)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    directory: Path, version: str
) -> None:
    resources = [*listed_resources(directory), *generated_configmaps(directory)]
    assert resources
    for resource in resources:
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(part) for part in err.path)
            pytest.fail(f"{directory.name}: {name} at {where}: {err.message}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = of_kind(base_resources(), "Deployment")["eventsched-consumer"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# ------------------------------------------------------------------ kustomization


@pytest.mark.parametrize(
    "directory", [pytest.param(d, id=d.relative_to(KUBERNETES).as_posix()) for d in KUSTOMIZATIONS]
)
def test_the_kustomization_lists_every_file_of_its_directory(directory: Path) -> None:
    spec = kustomization(directory)
    listed: set[Path] = set()
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory.name}: {entry} does not exist"
        if path.is_file():
            listed.add(path)
        else:
            assert (path / "kustomization.yaml").is_file(), f"{entry}: not a kustomization"
    for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
        for name in generator.get("files", []):
            assert (directory / name).is_file(), f"{directory.name}: {name} does not exist"
            listed.add((directory / name).resolve())
    present = {p.resolve() for p in directory.iterdir() if p.name != "kustomization.yaml"}
    assert present == listed, (
        f"{directory.name}: not in kustomization.yaml: {sorted(p.name for p in present - listed)}"
    )


def test_base_holds_every_role_with_its_autoscaler_budget_and_setup_jobs() -> None:
    resources = base_resources()
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for role in ROLES:
        for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert (kind, f"eventsched-{role}") in names, (kind, role)
        assert ("Service", f"eventsched-{role}-metrics") in names, role
    assert ("Service", "eventsched-api") in names
    jobs = of_kind(resources, "Job")
    assert set(jobs) == {f"eventsched-{name}" for name in SETUP_COMMANDS}
    for name, command in SETUP_COMMANDS.items():
        spec = jobs[f"eventsched-{name}"]["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["containers"]
        assert container["args"][-len(command) :] == command
    # The operator's Secret is referenced, never shipped.
    assert not of_kind(resources, "Secret")


def test_the_setup_step_applies_what_the_jobs_need_and_no_role() -> None:
    assert SETUP_SELECTOR in (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    listed = re.fullmatch(r".* notin \((.*)\)", SETUP_SELECTOR)
    assert listed
    excluded = set(listed[1].split(","))
    assert excluded == set(ROLES)
    resources = [*base_resources(), *generated_configmaps(BASE)]
    setup = {
        (r["kind"], r["metadata"]["name"])
        for r in resources
        if r["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in excluded
    }
    assert not {kind for kind, _ in setup} & {"Deployment", "HorizontalPodAutoscaler"}
    for name, template in pod_templates(resources).items():
        kind, _, job = name.partition("/")
        if kind != "Job":
            continue
        assert ("Job", job) in setup
        spec = template["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in setup, job
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in setup, job
            assert "secret" not in volume, f"{job}: the Secret is the operator's, made before"


# ------------------------------------------------------------------- the roles


def test_each_role_deployment_runs_its_role_and_probes_its_health_port() -> None:
    deployments = of_kind(base_resources(), "Deployment")
    assert set(deployments) == {f"eventsched-{role}" for role in ROLES}
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        role = role_of(container)
        assert name == f"eventsched-{role}"
        port = config.DEFAULT_PORTS[role]
        env = container_env(container)
        assert env["EVENTSCHED_HTTP__PORT"] == str(port), name
        liveness = container["livenessProbe"]["httpGet"]
        readiness = container["readinessProbe"]["httpGet"]
        assert liveness["path"] == "/healthz", name
        assert readiness["path"] == "/readyz", name
        assert named_port(container, liveness["port"]) == port, name
        assert named_port(container, readiness["port"]) == port, name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name


def test_every_pod_is_hardened_and_bounded() -> None:
    templates = pod_templates(base_resources())
    assert len(templates) == len(ROLES) + len(SETUP_COMMANDS)
    for name, template in templates.items():
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not context.get("privileged"), where
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{where}: {resource} {request} > {limit}"
            # A read-only root: the only writable place is a bounded emptyDir at /tmp.
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"], where
            for mount in container["volumeMounts"]:
                if mount["mountPath"] != "/tmp":
                    assert mount.get("readOnly") is True, f"{where}: {mount['mountPath']}"


def test_autoscalers_and_budgets_target_existing_deployments() -> None:
    resources = base_resources()
    deployments = of_kind(resources, "Deployment")
    autoscalers = of_kind(resources, "HorizontalPodAutoscaler")
    budgets = of_kind(resources, "PodDisruptionBudget")
    targeted: set[str] = set()
    for name, hpa in autoscalers.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), name
        assert ref["name"] in deployments, f"{name} scales unknown {ref['name']}"
        targeted.add(ref["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        # The HPA owns the count: a `replicas` in the Deployment would reset it on apply.
        assert "replicas" not in deployments[ref["name"]]["spec"], ref["name"]
    assert targeted == set(deployments)
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        selected = [
            d
            for d, deployment in deployments.items()
            if matches(selector, deployment["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected == [name], f"{name} selects {selected}"
        # maxUnavailable, not minAvailable: a budget of one pod must not block node drains.
        assert budget["spec"]["maxUnavailable"] == 1, name
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert matches(selector, deployment["spec"]["template"]["metadata"]["labels"]), name


@pytest.mark.parametrize(
    "directory", [pytest.param(d, id=d.relative_to(KUBERNETES).as_posix()) for d in KUSTOMIZATIONS]
)
def test_consumers_never_outnumber_the_partitions(directory: Path) -> None:
    hpa = of_kind(base_resources(), "HorizontalPodAutoscaler")["eventsched-consumer"]
    deployment = of_kind(base_resources(), "Deployment")["eventsched-consumer"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    partitions = pod_settings(template, container, directory).kafka.partitions
    assert hpa["spec"]["maxReplicas"] <= partitions


def test_services_select_role_pods_and_target_their_named_ports() -> None:
    resources = base_resources()
    templates = pod_templates(resources)
    for name, service in of_kind(resources, "Service").items():
        selector = service["spec"]["selector"]
        selected = [t for t in templates.values() if matches(selector, t["metadata"]["labels"])]
        assert len(selected) == 1, f"{name} selects {len(selected)} pod templates"
        (container,) = selected[0]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            named_port(container, port["targetPort"])  # the name exists on the container
        if name.endswith("-metrics"):
            assert service["spec"]["clusterIP"] == "None", f"{name}: one record per pod"
            assert [p["targetPort"] for p in service["spec"]["ports"]] == ["health"]


@pytest.mark.parametrize(
    "directory", [pytest.param(d, id=d.relative_to(KUBERNETES).as_posix()) for d in KUSTOMIZATIONS]
)
def test_each_pod_loads_valid_production_settings_for_its_role(
    directory: Path, tmp_path: Path
) -> None:
    for name, template in pod_templates(base_resources()).items():
        (container,) = template["spec"]["containers"]
        settings = pod_settings(template, container, directory)
        assert settings.env == "production", name
        assert settings.logging.format == "json", name
        if "--role" not in container["args"]:
            continue
        role = role_of(container)
        config.validate_for_roles(settings, {role})
        # Roles bind loopback by default; the kubelet's probes come from outside the pod.
        # Set explicitly, not left to the image's [production] section.
        assert container_env(container)["EVENTSCHED_HTTP__HOST"] == "0.0.0.0", name
        assert settings.http.host == "0.0.0.0", name
        assert settings.http.port == config.DEFAULT_PORTS[role], name
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > settings.shutdown.grace + 5, f"{name}: SIGKILL before the drain ends"
        if role == "api":
            check_mounted_api_tokens(template, container, settings, tmp_path)


def check_mounted_api_tokens(
    template: dict[str, Any], container: dict[str, Any], settings: config.Settings, tmp: Path
) -> None:
    """The api listens beyond loopback, so it needs tokens: each one a file of the
    mounted Secret, which the role accepts once the file holds a token."""
    api = settings.api
    assert container_env(container)["EVENTSCHED_API__HOST"] == "0.0.0.0"
    assert not is_loopback(api.host) and api.auth == "token" and api.tokens
    assert api.port == named_port(container, "api")
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {Path(m["mountPath"]): volumes[m["name"]] for m in container["volumeMounts"]}
    readable: list[ApiToken] = []
    for index, token in enumerate(api.tokens):
        path = Path(token.token_file)
        secret = mounts[path.parent]["secret"]
        assert secret["secretName"] == SECRET_NAME
        items = {item["path"]: item["key"] for item in secret["items"]}
        assert items[path.name] in SECRET_KEYS
        file = tmp / f"token-{index}"
        file.write_text("a-token-of-at-least-16-characters\n", encoding="utf-8")
        readable.append(msgspec.structs.replace(token, token_file=str(file)))
    check_api_settings(msgspec.structs.replace(api, tokens=tuple(readable)))


def test_pods_use_only_the_documented_secret_keys() -> None:
    used: set[str] = set()
    for template in pod_templates(base_resources()).values():
        for volume in template["spec"]["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] == SECRET_NAME
                used |= {item["key"] for item in volume["secret"]["items"]}
        for container in template["spec"]["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME
                    used.add(ref["key"])
    assert used == SECRET_KEYS
    documented = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    for key in SECRET_KEYS:
        assert f"`{key}`" in documented, f"docs/deployment.md does not name the Secret key {key}"


# ------------------------------------------------------------- compose, Dockerfile


def test_the_image_is_the_one_compose_builds_from_the_dockerfile() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text(encoding="utf-8"))
    image = re.fullmatch(r"(\S+):\$\{APP_IMAGE_TAG:-(\S+)\}", compose["x-app"]["image"])
    assert image, compose["x-app"]["image"]
    expected = f"{image.group(1)}:{image.group(2)}"
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    (user,) = re.findall(r"^USER (\d+):(\d+)$", final, re.M)
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", final, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", final, re.M) for p in line.split()}
    assert json.loads(entrypoint) == ["python", "-m", "eventsched"]
    for name, template in pod_templates(base_resources()).items():
        pod = template["spec"]["securityContext"]
        assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user, name
        for container in template["spec"]["containers"]:
            assert container["image"] == expected, name
            assert "command" not in container, f"{name}: keep the image's entry point"
            for port in container.get("ports", []):
                assert port["containerPort"] in exposed, f"{name}: EXPOSE {port['containerPort']}"
    for overlay in OVERLAYS:
        for entry in kustomization(overlay).get("images", []):
            assert entry["name"] == image.group(1), overlay.name


# ------------------------------------------------------------------------ kubectl


@pytest.mark.parametrize(
    "directory", [pytest.param(d, id=d.relative_to(KUBERNETES).as_posix()) for d in KUSTOMIZATIONS]
)
def test_kubectl_renders_the_kustomization_into_valid_resources(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendered output is not checked here")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for resource in rendered:
        kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[0], strict=True)
    (settings_map,) = [
        r["metadata"]["name"]
        for r in rendered
        if r["kind"] == "ConfigMap" and r["metadata"]["name"].startswith(f"{SETTINGS_MAP}-")
    ]
    for template in pod_templates(rendered).values():
        maps = {v["configMap"]["name"] for v in template["spec"]["volumes"] if "configMap" in v}
        assert maps == {settings_map}, "the pods mount the generated (hashed) ConfigMap"
    namespace = kustomization(directory).get("namespace")
    if namespace:
        for resource in rendered:
            if resource["kind"] != "Namespace":
                assert resource["metadata"]["namespace"] == namespace
