"""The deployment files start the Procfile's commands with real settings, probe real routes and keep Redis durable."""
from __future__ import annotations

import configparser
import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from api import create_app
from api.auth import OPEN_PATHS
from shared.dispatch import PROCESS_CHUNK, make_celery
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEFAULTS = Settings()


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name.strip(): command.strip() for name, _, command in (line.partition(":") for line in lines if line)}


PROCFILE = procfile()
#: What an environment may set: a setting of shared/settings.py, or a variable the Procfile's lines read.
KNOWN_VARIABLES = set(Settings.model_fields) | set(re.findall(r"\$\{(\w+):-", "\n".join(PROCFILE.values())))


def assert_known(variables, where: str) -> None:
    unknown = sorted(set(variables) - KNOWN_VARIABLES)
    assert not unknown, f"{where} sets {unknown}, which are neither settings nor read by the Procfile"


def redis_is_durable(args: list[str]) -> None:
    pairs = dict(itertools.pairwise(args))
    assert pairs.get("--appendonly") == "yes"
    assert pairs.get("--appendfsync") == "everysec"
    assert pairs.get("--maxmemory-policy") == "noeviction"


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[str]:
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1/0", "MODELS_DIR": str(tmp_path_factory.mktemp("models"))})
    return {rule.rule for rule in app.url_map.iter_rules()}


def test_procfile_has_the_three_processes():
    """The Procfile names web, worker and beat; the worker consumes the chunk queue the code sends to."""
    assert set(PROCFILE) == {"web", "worker", "beat"}
    assert '--queues "${CHUNK_QUEUE:-' + DEFAULTS.CHUNK_QUEUE + '}"' in PROCFILE["worker"]
    assert make_celery(DEFAULTS).conf.task_routes[PROCESS_CHUNK]["queue"] == DEFAULTS.CHUNK_QUEUE


def test_health_routes_exist_and_need_no_key(routes):
    """The probes' routes are served, and a probe (which has no API key) may call them."""
    assert {"/healthz", "/readyz"} <= routes
    assert {"/healthz", "/readyz"} <= OPEN_PATHS


# -- docker compose ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def unescape_dollars(raw: str) -> str:
    """Compose and systemd expand `$NAME` themselves; `$$` hands a literal `$` on to bash."""
    assert "$" not in raw.replace("$$", ""), f"a lone $ would be expanded before bash sees it: {raw}"
    return raw.replace("$$", "$")


def compose_command(service: dict) -> str:
    shell, flag, line = service["command"]
    assert (shell, flag) == ("bash", "-c")
    return unescape_dollars(line)


@pytest.mark.parametrize(("service", "process"), [("api", "web"), ("worker", "worker"), ("beat", "beat")])
def test_compose_runs_the_procfile_lines(compose, service, process):
    """Each compose service runs its Procfile line word for word, with settings that exist."""
    assert compose_command(compose[service]) == PROCFILE[process]
    assert_known(compose[service]["environment"], f"compose service {service}")
    assert compose[service]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_compose_redis_keeps_an_append_only_file_and_never_evicts(compose):
    """Redis in compose: AOF fsynced every second, noeviction, data on a named volume."""
    redis_is_durable(compose["redis"]["command"])
    assert compose["redis"]["volumes"] == ["redis-data:/data"]


def test_compose_broker_is_the_redis_or_a_rabbitmq_that_waits_for_long_tasks(compose):
    """The broker defaults to the state Redis; the optional RabbitMQ lets a source read hold its delivery."""
    env = compose["api"]["environment"]
    default = re.fullmatch(r"\$\{CELERY_BROKER_URL:-(.+)\}", env["CELERY_BROKER_URL"]).group(1)
    assert default == env["REDIS_URL"]
    assert compose["rabbitmq"]["profiles"] == ["rabbitmq"]
    erl_args = compose["rabbitmq"]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()
    consumer_timeout_ms = int(erl_args[erl_args.index("consumer_timeout") + 1])
    assert consumer_timeout_ms / 1000 > DEFAULTS.SOURCE_READ_TIME_LIMIT + 30 > DEFAULTS.CHUNK_TIME_LIMIT


def test_compose_flower_and_health_checks(compose, routes):
    """Flower runs on the worker app; the api's health check calls /healthz and /readyz, routes that exist."""
    assert compose["flower"]["command"][:4] == ["celery", "-A", "worker.app", "flower"]
    assert_known(compose["flower"]["environment"], "compose service flower")
    check = " ".join(compose["api"]["healthcheck"]["test"])
    probed = set(re.findall(r"'(/\w+)'", check))
    assert probed == {"/healthz", "/readyz"} and probed <= routes


def test_compose_worker_waits_for_running_chunks(compose):
    """SIGTERM (Celery's warm shutdown) and a grace period longer than a chunk may run."""
    worker = compose["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert float(worker["stop_grace_period"].rstrip("s")) > DEFAULTS.CHUNK_TIME_LIMIT


# -- Kubernetes ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest is in the kustomization, and every listed one exists"
    objects = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def container(objects, kind: str, name: str) -> dict:
    (only,) = objects[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize(("deployment", "process"), [("predq-api", "web"), ("predq-worker", "worker"),
                                                      ("predq-beat", "beat")])
def test_k8s_deployments_run_the_procfile_lines(k8s, deployment, process):
    """Each Deployment runs its Procfile line word for word, with the settings ConfigMap."""
    c = container(k8s, "Deployment", deployment)
    assert c["command"] == ["bash", "-c", PROCFILE[process]]
    assert c["envFrom"] == [{"configMapRef": {"name": "predq-settings"}}]


def test_k8s_settings_are_real(k8s):
    """The ConfigMap holds settings (or Procfile variables) only, with values the settings accept."""
    data = k8s[("ConfigMap", "predq-settings")]["data"]
    assert_known(data, "the ConfigMap")
    Settings(**{k: v for k, v in data.items() if k in Settings.model_fields})  # raises on a bad value
    assert data["CHUNK_QUEUE"] == DEFAULTS.CHUNK_QUEUE


def test_k8s_api_probes_point_at_health_routes(k8s, routes):
    """Liveness on /healthz, readiness on /readyz, on the port the container serves; the Service reaches it."""
    c = container(k8s, "Deployment", "predq-api")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in routes
        assert c[probe]["httpGet"]["port"] in ports
    assert ports["http"] == int(k8s[("ConfigMap", "predq-settings")]["data"]["PORT"])
    service = k8s[("Service", "predq-api")]["spec"]
    assert service["selector"] == k8s[("Deployment", "predq-api")]["spec"]["template"]["metadata"]["labels"]
    assert service["ports"][0]["targetPort"] == "http"


def test_k8s_beat_is_a_single_replica(k8s):
    """Exactly one beat, and a new pod starts only after the old one stopped."""
    spec = k8s[("Deployment", "predq-beat")]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_k8s_worker_waits_for_running_chunks(k8s):
    """A worker pod gets longer than a chunk's hard time limit to shut down warm."""
    grace = k8s[("Deployment", "predq-worker")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS.CHUNK_TIME_LIMIT


def test_k8s_redis_is_durable(k8s):
    """Redis: a StatefulSet whose AOF directory is on a persistent volume claim; AOF everysec, noeviction."""
    sts = k8s[("StatefulSet", "predq-redis")]["spec"]
    c = container(k8s, "StatefulSet", "predq-redis")
    redis_is_durable(c["args"])
    data_dir = dict(itertools.pairwise(c["args"]))["--dir"]
    (claim,) = sts["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in c["volumeMounts"]
    assert sts["replicas"] == 1
    url = k8s[("ConfigMap", "predq-settings")]["data"]["REDIS_URL"]
    assert url.startswith(f"redis://{sts['serviceName']}:6379/")


def test_k8s_workers_scale_on_the_chunk_queue(k8s):
    """KEDA scales the worker Deployment on the length of the queue chunk messages are sent to."""
    scaled = k8s[("ScaledObject", "predq-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "predq-worker"
    assert ("Deployment", "predq-worker") in k8s
    assert scaled["minReplicaCount"] >= 1
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == make_celery(DEFAULTS).conf.task_routes[PROCESS_CHUNK]["queue"]
    assert trigger["metadata"]["address"].startswith("predq-redis.")


# -- systemd ------------------------------------------------------------------------------------------------------

def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def environment_file() -> dict[str, str]:
    lines = (DEPLOY / "systemd" / "predq.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize(("name", "process"), [("predq-web.service", "web"), ("predq-worker.service", "worker"),
                                                ("predq-beat.service", "beat")])
def test_systemd_units_run_the_procfile_lines(name, process):
    """Each unit runs its Procfile line word for word from the environment file, and restarts on failure."""
    service = unit(name)["Service"]
    argv = shlex.split(unescape_dollars(service["ExecStart"]))
    assert argv == ["/bin/bash", "-c", PROCFILE[process]]
    assert service["EnvironmentFile"] == "/etc/predq/predq.env"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the main process, which stops its children in order
    assert service["WorkingDirectory"] == "/opt/predq"


def test_systemd_worker_stops_warm():
    """The worker unit waits longer than a chunk's hard time limit before it kills anything."""
    assert float(unit("predq-worker.service")["Service"]["TimeoutStopSec"]) > DEFAULTS.CHUNK_TIME_LIMIT


def test_systemd_environment_file_holds_real_settings():
    """The environment file sets settings (or Procfile variables) only, with values the settings accept."""
    env = environment_file()
    assert_known(env, "predq.env")
    Settings(**{k: v for k, v in env.items() if k in Settings.model_fields})
    assert {"REDIS_URL", "MODELS_DIR"} <= set(env)
