"""Static checks of the deployment files: they parse, wire up, probe health and hold no secrets."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "k8s"
DEPLOY_FILES = [
    REPO / "dagster.yaml",
    DOCKER / "dagster.yaml",
    DOCKER / "docker-compose.yaml",
    DOCKER / "workspace.docker.yaml",
    DOCKER / "Dockerfile",
    DOCKER / "Dockerfile.dagster",
    *sorted(K8S.glob("*.yaml")),
]


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _yaml_docs(path)]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_every_deploy_file_exists_and_yaml_parses():
    for path in DEPLOY_FILES:
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
        if path.suffix == ".yaml":
            assert _yaml_docs(path), f"{path.relative_to(REPO)} is empty"
    assert len(list(K8S.glob("*.yaml"))) >= 4


def test_instance_files_are_valid_dagster_instance_config(monkeypatch, tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    for name, env in (("dagster.yaml", {}), ("docker/dagster.yaml", {"DAGSTER_PG_HOST": "h", "DAGSTER_PG_DB": "d",
                                                                       "DAGSTER_PG_USERNAME": "u", "DAGSTER_PG_PASSWORD": "p"})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        home = tmp_path / name.replace("/", "_")
        home.mkdir()
        (home / "dagster.yaml").write_text((REPO / name).read_text())
        config, _ = dagster_instance_config(str(home))
        assert config["telemetry"]["enabled"] is False
        assert config["run_retries"]["enabled"] is True
    docker_cfg = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    assert "postgres" in docker_cfg["storage"], "the deployed instance keeps runs in PostgreSQL"


def test_compose_is_the_deploy_docker_pattern():
    compose = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "user_code", "webserver", "daemon", "search_api"} <= set(services)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    user_code = " ".join(services["user_code"]["command"])
    assert "dagster api grpc" in user_code and "research_pipeline.definitions" in user_code
    assert services["user_code"]["build"]["dockerfile"] == "docker/Dockerfile"
    webserver = " ".join(services["webserver"]["entrypoint"])
    assert webserver.startswith("dagster-webserver") and "-w workspace.yaml" in webserver
    assert " ".join(services["daemon"]["entrypoint"]).startswith("dagster-daemon run")
    for name in ("webserver", "daemon", "user_code"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "serve" in services["search_api"]["command"]

    workspace = yaml.safe_load((DOCKER / "workspace.docker.yaml").read_text())
    grpc = workspace["load_from"][0]["grpc_server"]
    assert grpc["host"] in services, "workspace must point at the user-code service"
    assert str(grpc["port"]) in services["user_code"]["command"]
    assert grpc["location_name"] == "research_pipeline"
    dockerfile = (DOCKER / "Dockerfile.dagster").read_text()
    assert "workspace.docker.yaml" in dockerfile and "docker/dagster.yaml" in dockerfile


def test_dockerfiles_install_the_pinned_versions():
    pins = _pins()
    user_code = (DOCKER / "Dockerfile").read_text()
    assert "COPY pyproject.toml" in user_code and re.search(r"pip install[^\n]* \.", user_code), (
        "the user-code image installs the package from pyproject.toml (its pins)"
    )
    system = (DOCKER / "Dockerfile.dagster").read_text()
    installed = dict(re.findall(r"\b(dagster[a-z\-]*)==([0-9][^\s\\]*)", system))
    assert {"dagster", "dagster-webserver", "dagster-postgres"} <= set(installed)
    for package, version in installed.items():
        assert pins.get(package) == version, f"Dockerfile.dagster pins {package}=={version}, pyproject {pins.get(package)}"


def test_k8s_deployments_have_probes_and_services_match():
    objects = _k8s_objects()
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    names = {d["metadata"]["name"] for d in deployments}
    for role in ("user-code", "webserver", "daemon", "search-api"):
        assert f"research-pipeline-{role}" in names
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for container in dep["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, dep["metadata"]["name"]
            for ref in container.get("envFrom", []):
                assert ref["configMapRef"]["name"] in config_maps
        for volume in dep["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
    search = next(d for d in deployments if d["metadata"]["name"] == "research-pipeline-search-api")
    container = search["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments
        ), f"Service {svc['metadata']['name']} selects no Deployment"


def _env_entries(obj):
    if isinstance(obj, dict):
        if "name" in obj and ("value" in obj or "valueFrom" in obj):
            yield obj
        for value in obj.values():
            yield from _env_entries(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _env_entries(value)


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|DATABASE_URL|ACCESS_KEY", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_secrets_in_files(path):
    text = path.read_text()
    for match in URL_WITH_PASSWORD.finditer(text):
        password = match.group(1)
        assert password.startswith(("${", "<")), f"literal password in a URL in {path.name}"
    if path.parent == K8S:
        docs = _yaml_docs(path)
        assert all(d["kind"] != "Secret" for d in docs), "Secrets are created out of band, never committed"
        for entry in _env_entries(docs):
            if SECRET_NAME.search(entry["name"]):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{entry['name']} must come from a Secret"
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert not any(SECRET_NAME.search(k) for k in doc.get("data", {})), "secret-like key in a ConfigMap"
    if path.name == "docker-compose.yaml":
        for name, service in yaml.safe_load(text)["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if "PASSWORD" in key:
                    assert str(value).startswith("${"), f"{name}.{key} must come from the environment"


def _env_refs(obj) -> set[str]:  # noqa: ANN001
    """Every `env: NAME` that a Dagster instance file reads."""
    if isinstance(obj, dict):
        found = {obj["env"]} if isinstance(obj.get("env"), str) and len(obj) == 1 else set()
        return found.union(*(_env_refs(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_env_refs(v) for v in obj))
    return set()


def _compose_env(service: str) -> set[str]:
    compose = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    env = compose["services"][service].get("environment") or {}
    return set(env)


def _k8s_env(deployment: str) -> set[str]:
    """Variables a Deployment's containers get: its env entries plus the ConfigMaps it mounts."""
    objects = _k8s_objects()
    configmaps = {o["metadata"]["name"]: set(o.get("data") or {}) for o in objects if o.get("kind") == "ConfigMap"}
    dep = next(o for o in objects if o.get("kind") == "Deployment" and o["metadata"]["name"] == deployment)
    names: set[str] = set()
    for container in dep["spec"]["template"]["spec"]["containers"]:
        names |= {e["name"] for e in container.get("env") or []}
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                names |= configmaps[source["configMapRef"]["name"]]
    return names


@pytest.mark.parametrize(
    "instance_file, environments",
    [
        ("docker/dagster.yaml", {"compose webserver": lambda: _compose_env("webserver"),
                                 "compose daemon": lambda: _compose_env("daemon"),
                                 "compose user_code": lambda: _compose_env("user_code")}),
        ("deploy/dagster.prod.yaml", {f"k8s {name}": (lambda n=name: _k8s_env(n))
                                      for name in ("research-pipeline-webserver", "research-pipeline-daemon",
                                                   "research-pipeline-user-code")}),
    ],
)
def test_instance_file_loads_with_exactly_the_deploy_environment(instance_file, environments, pg_url, tmp_path,
                                                                 monkeypatch):
    """Each shipped instance file reads only variables its deployment sets, and then loads for real.

    The variables are bound to the machine's PostgreSQL (a fresh database) and the instance is
    built by Dagster itself, storage, run coordinator, launcher and python_logs handlers included.
    """
    import dagster as dg
    import sqlalchemy as sa

    config = yaml.safe_load((REPO / instance_file).read_text())
    needed = _env_refs(config)
    assert needed, f"{instance_file} reads no variables?"
    for where, provided in environments.items():
        missing = needed - provided()
        assert not missing, f"{instance_file} reads {sorted(missing)}, which {where} does not set"
    url = sa.engine.make_url(pg_url)
    values = {"DAGSTER_PG_HOST": url.host, "DAGSTER_PG_DB": url.database, "DAGSTER_PG_USERNAME": url.username,
              "DAGSTER_PG_PASSWORD": url.password or ""}
    for name in needed:
        assert name in values, f"no test value for {name}"
        monkeypatch.setenv(name, values[name])
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / instance_file).read_text())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs() == []
        handlers = instance.get_handlers()
        assert instance.managed_python_loggers == ["research_pipeline"]
        assert any(h.formatter is not None and "ProcessorFormatter" in type(h.formatter).__name__ for h in handlers), (
            "production run logs are JSON"
        )


def _constraints() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_the_lock_holds_every_direct_pin_at_the_same_version():
    locked = _constraints()
    for name, version in _pins().items():
        key = name.replace("_", "-")
        assert key in locked, f"{name} is pinned in pyproject.toml but missing from constraints.txt"
        assert locked[key].split("+")[0] == version, f"{name}: pyproject {version}, constraints {locked[key]}"


def test_images_build_from_pinned_bases_with_the_lock_and_a_small_context():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.dagster"):
        text = dockerfile.read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert bases, dockerfile
        for base in bases:
            assert "@sha256:" in base or re.search(r":\d+\.\d+\.\d+", base), f"{dockerfile.name}: floating base {base}"
        assert "-c " in text and "constraints.txt" in text, f"{dockerfile.name} does not install with the lock"
        assert re.search(r"^USER\s+(?!root)\S+", text, flags=re.M), f"{dockerfile.name} runs as root"
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", ".rp"):
        assert path in ignored, f".dockerignore must keep {path} out of the build context"


def _tool(name: str) -> str:
    import shutil
    import sys

    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip test extra)"
    return found


def test_every_manifest_validates_against_the_kubernetes_schemas():
    import subprocess

    manifests = sorted(str(p) for p in K8S.glob("*.yaml"))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", *manifests], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {o["kind"] for o in _k8s_objects()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"} <= kinds


def test_dockerfiles_pass_hadolint():
    import subprocess

    out = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.dagster")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_search_tier_scales_and_survives_drains():
    objects = _k8s_objects()
    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    pdb = next(o for o in objects if o["kind"] == "PodDisruptionBudget")
    search = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"])
    labels = search["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict a replica"
    container = search["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    for svc in (o for o in objects if o["kind"] == "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{svc['metadata']['name']} faces outside"


def test_helm_values_for_the_official_chart():
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    pins = _pins()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    migration = next(t for t in queued["tagConcurrencyLimits"] if t["key"] == "research_pipeline/migration")
    assert migration["limit"] < queued["maxConcurrentRuns"]
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert values["computeLogManager"]["type"] == "S3ComputeLogManager"
    assert values["pythonLogs"]["managedPythonLoggers"] == ["research_pipeline"]
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "research_pipeline.definitions"]
    configmaps = {o["metadata"]["name"] for o in _k8s_objects() if o["kind"] == "ConfigMap"}
    assert {c["name"] for c in deployment["envConfigMaps"]} <= configmaps
    for image in (values["dagsterWebserver"]["image"], values["dagsterDaemon"]["image"]):
        assert image["tag"] == pins["dagster"], "the chart's images run the pinned Dagster release"
    assert "dagster-k8s" in pins and "dagster-docker" in pins, "run workers load the instance's run launcher"
    launch_tags = {t["key"] for t in queued["tagConcurrencyLimits"]}
    code = "".join(p.read_text() for p in (REPO / "research_pipeline" / "defs").rglob("*.py"))
    for key in launch_tags - {"dagster/backfill"}:
        assert key in code, f"the chart limits runs tagged {key}, which no job sets"


# -- docker-compose: 3 replicas behind nginx, one container per run ------------------------------

COMPOSE_ENV = {"POSTGRES_PASSWORD": "from-the-environment", "RP_INBOX_HOST": "/srv/papers", "PATH": "/usr/bin:/bin"}


def _compose_config() -> dict:
    """The compose file as Debian's docker-compose resolves it (interpolation, merges, validation)."""
    import shutil
    import subprocess

    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("Debian's docker-compose is not installed: apt-get install -y docker-compose")
    proc = subprocess.run([binary, "-f", str(DOCKER / "docker-compose.yaml"), "config"], env=COMPOSE_ENV,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_config_resolves_and_only_nginx_faces_users():
    import subprocess
    import shutil

    config = _compose_config()
    services = config["services"]
    published = {name: [str(p.get("host_ip", "")) + ":" + str(p.get("published", "")) if isinstance(p, dict) else str(p)
                        for p in service.get("ports", [])] for name, service in services.items()}
    assert services["search_api"]["deploy"]["replicas"] == 3
    assert not published["search_api"], "replicas have no host port: nginx is their only way in"
    for internal in ("postgres", "redis", "user_code", "daemon"):
        assert not published[internal], f"{internal} must not publish a port"
    assert all(p.startswith("127.0.0.1:") for p in published["webserver"]), published["webserver"]
    assert published["nginx"], "nginx is the public front"
    # Without the password the file refuses to resolve, naming the variable.
    env = {k: v for k, v in COMPOSE_ENV.items() if k != "POSTGRES_PASSWORD"}
    proc = subprocess.run([shutil.which("docker-compose"), "-f", str(DOCKER / "docker-compose.yaml"), "config"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr


def test_compose_runs_each_run_in_its_own_container():
    config = _compose_config()
    instance = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    services = config["services"]
    for name in ("daemon", "webserver"):
        env = set(services[name]["environment"])
        missing = set(launcher["config"]["env_vars"]) - env
        assert not missing, f"the run launcher passes {sorted(missing)} on, which compose's {name} does not set"
        assert "/var/run/docker.sock" in " ".join(str(v) for v in services[name]["volumes"])
    # Run containers join the compose network and mount the same named volumes as the code server.
    assert launcher["config"]["network"] in {n.get("name") for n in config["networks"].values()}
    volume_names = {v.get("name") for v in config["volumes"].values()}
    for mount in launcher["config"]["container_kwargs"]["volumes"]:
        volume, _, target = mount.partition(":")
        assert volume in volume_names, f"{volume} is not a named volume of the compose file"
        assert any(target.split(":")[0] in str(v) for v in services["user_code"]["volumes"])
    user_code = services["user_code"]
    assert user_code["environment"]["DAGSTER_CURRENT_IMAGE"] == user_code["image"]
    import dagster_docker

    assert hasattr(dagster_docker, "DockerRunLauncher")


def test_compose_nginx_is_the_shipped_config_pointed_at_the_replicas(tmp_path):
    """Run the nginx service's own command on the shipped file; the result must pass `nginx -t`."""
    import shutil
    import subprocess

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    service = _compose_config()["services"]["nginx"]
    command = service["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("$$", "$")
    script = script.replace("/etc/research_pipeline/nginx.conf", str(REPO / "deploy" / "nginx" / "nginx.conf"))
    script = script.replace("/etc/nginx/nginx.conf", str(tmp_path / "nginx.conf"))
    script = script.split("&& exec nginx")[0]
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    text = (tmp_path / "nginx.conf").read_text()
    upstream = re.search(r"upstream search_replicas \{(.*?)\}", text, re.S).group(1)
    assert re.findall(r"server (\S+)", upstream) == ["search_api:8080"]
    assert "listen 8080;" in text and "access_log /dev/stdout;" in text
    # Docker's DNS answers `search_api` inside compose; here it is loopback.
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(text.replace("search_api:8080", "127.0.0.1:1").replace("listen 8080;",
                                                                                                 "listen 127.0.0.1:1;"))
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g",
                           f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/logs/error.log;"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


PLACEHOLDER_PASSWORDS = {"secret", "password", "...", "xxx"}


def test_no_credentials_anywhere_in_the_repository():
    """Every tracked text file: no cloud keys, no private keys, no literal passwords in URLs.

    Examples in docs may use an obvious placeholder (`rp:secret@db`); tests use moto's fake
    credentials, which are not secrets.
    """
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert len(files) > 100
    findings = []
    for name in files:
        path = REPO / name
        if path.suffix in {".png", ".pdf", ".whl"} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if re.search(r"\bAKIA[0-9A-Z]{16}\b", text) or re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            findings.append(f"{name}: a cloud or private key")
        if name.startswith("research_pipeline_tests/"):
            continue
        for match in URL_WITH_PASSWORD.finditer(text):
            password = match.group(1)
            if not password.startswith(("${", "<", "$")) and password not in PLACEHOLDER_PASSWORDS:
                findings.append(f"{name}: a literal password in a URL ({match.group(0)[:40]}...)")
    assert not findings, findings
