"""Several hosts on one machine: network namespaces joined by veth pairs to one bridge, each with its own hostname.

A :class:`Network` is a switch (a namespace holding a bridge) and hosts (namespaces whose ``eth0`` is one end of a
veth pair whose other end is on the bridge), in a private /24 under 10.77.0.0/16. This machine's own namespace joins
the bridge too, as the client that reaches the API and Redis. Every name carries this process's pid (and a sequence
number), so runs side by side never meet. :meth:`Network.close` removes every namespace, veth and bridge; it is
idempotent, registered with ``atexit`` as well, and the fixtures call it in their finalizers.

A process runs on a host through :meth:`Host.wrap`: ``ip netns exec`` into the host's namespace, ``unshare --uts``
for its own hostname, then ``exec`` of the command, so the pid that :mod:`tests.support.processes` tracks (and whose
process group it kills) is the process itself.

:class:`Cluster` is the layout of the multi-host tests and ``bench/hosts.py``: Redis, the API and beat on host ``a``;
workers started from the Procfile's ``worker`` line on the other hosts, each knowing only ``REDIS_URL`` (host a's
address) and its own ``MODELS_DIR``. With ``chunk_store="s3"`` host a runs moto's S3-compatible server too, and
every process is also told ``CHUNK_STORE_URL`` (``s3://<bucket>/chunks``) and the endpoint and credentials boto
reads (``AWS_ENDPOINT_URL``: host a's address), so chunk blobs go over the network to the bucket.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli.stack import procfile
from shared import keys
from tests.support.processes import (
    REPO_ROOT,
    ApiServer,
    MotoServer,
    RedisServer,
    _ManagedProcess,
    wait_for,
)

SUBNET_PREFIX = "10.77"
LOCAL_OCTET = 254  # this machine's own address on every network
_READY_RE = re.compile(r"@\S+ ready\.")
_seq = itertools.count()


class NetnsError(RuntimeError):
    """An `ip` command failed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; a failure raises NetnsError with the command and its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


_probe_lock = threading.Lock()
_probe: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (for a skip reason), or None when they can."""
    with _probe_lock:
        if not _probe:
            _probe.append(_probe_namespaces())
        return _probe[0]


def _probe_namespaces() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); this test runs as uid %d" % os.geteuid()
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command on PATH (iproute2 / util-linux), needed to build hosts with namespaces"
    name = f"pq{os.getpid()}probe"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        return f"cannot create a network namespace: {e}"
    try:
        done = subprocess.run(["ip", "netns", "exec", name, "unshare", "--uts", "true"], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            return f"cannot run a process in a network namespace with its own hostname: {done.stderr.strip()}"
    finally:
        ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    """One namespace on the bridge: its own address, hostname and link (the veth end on the bridge)."""

    name: str
    netns: str
    address: str
    hostname: str
    link: str

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run in this host's namespace under its own hostname (the same pid throughout: every step execs)."""
        set_hostname = 'printf %s "$0" > /proc/sys/kernel/hostname && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", set_hostname, self.hostname, *command]


_open_networks: list[Network] = []


def _close_all() -> None:
    for network in list(_open_networks):
        try:
            network.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_close_all)


def _free_subnet() -> int:
    """A third octet whose 10.77.X.0/24 no route of this machine uses (a run beside this one may hold another)."""
    used = ip("-4", "route", "show").stdout
    start = os.getpid() % 250
    for k in range(250):
        octet = (start + k) % 250 + 1
        if f"{SUBNET_PREFIX}.{octet}." not in used:
            return octet
    raise NetnsError(f"no free /24 under {SUBNET_PREFIX}.0.0/16")


class Network:
    """A bridge in its own namespace, hosts joined to it by veth pairs, and this machine on it too."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}n{next(_seq)}"
        self.switch = f"pq{self.tag}-sw"
        self.bridge = f"br{self.tag}"
        self.local_link = f"pq{self.tag}"       # this machine's end, in its own namespace
        self.octet = 0
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._closed = False

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def address(self, last: int) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.{last}"

    def open(self) -> Network:
        """Make the switch and join this machine to it (address .254); close() undoes whatever was done."""
        _open_networks.append(self)
        try:
            self.octet = _free_subnet()
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", self.bridge, "type", "bridge")
            ip("-n", self.switch, "link", "set", self.bridge, "up")
            # Created inside the switch namespace with its peer put straight into ours: no name is ever taken in
            # our namespace but this one, and deleting the switch namespace would take both ends away.
            ip("-n", self.switch, "link", "add", f"v{self.tag}l", "type", "veth", "peer", "name", self.local_link,
               "netns", "1")
            ip("-n", self.switch, "link", "set", f"v{self.tag}l", "master", self.bridge, "up")
            ip("addr", "add", f"{self.address(LOCAL_OCTET)}/24", "dev", self.local_link)
            ip("link", "set", self.local_link, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new host on the bridge: namespace, veth pair, address .N (N = hosts so far + 1), its own hostname."""
        netns = f"pq{self.tag}-{name}"
        host = Host(name=name, netns=netns, address=self.address(len(self.hosts) + 1),
                    hostname=f"predq-{name}-{self.tag}", link=f"v{self.tag}{name}")
        self._add_namespace(netns)
        ip("-n", self.switch, "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.switch, "link", "set", host.link, "master", self.bridge, "up")
        ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Take the host off the network: its link on the bridge goes down (its processes keep running)."""
        ip("-n", self.switch, "link", "set", host.link, "down")

    def mend(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.link, "up")

    def close(self) -> None:
        """Remove every namespace (and with them the bridge and veth ends) and our own veth end; wait until gone.

        Processes should be stopped first (by their pid / process group); any still found in one of these
        namespaces is killed by pid, since a namespace lives on as long as a process is in it.
        """
        if self._closed:
            return
        self._closed = True
        for netns in reversed(self._namespaces):
            for pid in ip("netns", "pids", netns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", netns, check=False)
        if self.octet:
            ip("link", "del", self.local_link, check=False)
        wait_for(lambda: not self.leftovers(), timeout=30, interval=0.1,
                 what=f"namespaces and links of network {self.tag} to go")
        if self in _open_networks:
            _open_networks.remove(self)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist."""
        names = {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}
        found = [n for n in self._namespaces if n in names]
        if ip("link", "show", self.local_link, check=False).returncode == 0:
            found.append(self.local_link)
        return found


# --------------------------------------------------------------------------
# Processes on hosts
# --------------------------------------------------------------------------


class HostRedis(RedisServer):
    """A Redis-compatible server listening on a host's address."""

    def __init__(self, host: Host, *, dir: str) -> None:
        super().__init__(dir=dir)
        self.host = host

    @property
    def url(self) -> str:
        return f"redis://{self.host.address}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--bind") + 1] = self.host.address
        return self.host.wrap([*cmd, "--protected-mode", "no"])

    def client(self, **kwargs) -> redis.Redis:
        options = {"socket_connect_timeout": 5, "socket_timeout": 30, **kwargs}
        return redis.Redis(host=self.host.address, port=self.port, db=0, **options)


class HostApi(ApiServer):
    """gunicorn serving the API on a host's address."""

    def __init__(self, host: Host, redis_url: str, *, models_dir: str, env: dict[str, str], log_dir: str) -> None:
        super().__init__(redis_url, models_dir=models_dir, env=env, log_dir=log_dir)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--bind") + 1] = f"{self.host.address}:{self.port}"
        return self.host.wrap(cmd)


class HostMoto(MotoServer):
    """moto's S3-compatible server listening on a host's address: the chunk store of the worker hosts."""

    def __init__(self, host: Host, *, log_dir: str) -> None:
        super().__init__(log_dir)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("-H") + 1] = self.host.address
        return self.host.wrap(cmd)


def host_env(redis_url: str, models_dir: str, extra: dict[str, str]) -> dict[str, str]:
    """All a Procfile process on a worker host is told: where Redis is, where its models are, and settings."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           "REDIS_URL": redis_url, "MODELS_DIR": str(models_dir)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ProcfileProcess(_ManagedProcess):
    """One Procfile entry (`worker` or `beat`), run by `sh -c` on a host with only the environment it is given."""

    def __init__(self, entry: str, host: Host, env: dict[str, str], *, log_dir: str, ready: str) -> None:
        super().__init__(log_dir, f"{entry}-{host.name}.log")
        self.kind = f"procfile-{entry}@{host.name}"
        self.entry = entry
        self.host = host
        self.env = env
        self.ready = re.compile(ready)

    @property
    def name(self) -> str:
        """The Celery node name: Celery's default, `celery@<hostname>`, from the host's own hostname."""
        return f"celery@{self.host.hostname}"

    def command(self) -> list[str]:
        return self.host.wrap(["sh", "-c", procfile()[self.entry]])

    def start(self, *, wait_ready: bool = True) -> ProcfileProcess:
        self._launch(self.command(), env=self.env, cwd=REPO_ROOT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90) -> ProcfileProcess:
        self._wait_ready(lambda: self.ready.search(self._current_log()), timeout=timeout,
                         what=f"{self.kind} to log {self.ready.pattern!r}")
        return self

    def records(self) -> list[dict]:
        """Its JSON log lines."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found


def procfile_worker(host: Host, redis_url: str, models_dir: str, *, env: dict[str, str], log_dir: str) -> ProcfileProcess:
    return ProcfileProcess("worker", host, host_env(redis_url, models_dir, env), log_dir=log_dir,
                           ready=_READY_RE.pattern)


def procfile_beat(host: Host, redis_url: str, models_dir: str, *, env: dict[str, str], log_dir: str) -> ProcfileProcess:
    return ProcfileProcess("beat", host, host_env(redis_url, models_dir, env), log_dir=log_dir,
                           ready=r"beat: Starting\.\.\.")


# --------------------------------------------------------------------------
# The layout: service on host a, workers elsewhere
# --------------------------------------------------------------------------


@dataclass
class Cluster:
    """Redis, the API (with `keys` API keys) and beat on host `a`; workers added on the other hosts.

    `chunk_store`: "redis" (blobs in Redis) or "s3" (moto on host a, and CHUNK_STORE_URL for every process).
    """

    root: Path
    models_dir: str                      # host a's copy of the models
    settings: dict[str, str]             # for every process: timeouts and the like
    worker_hosts: tuple[str, ...] = ("b", "c")
    keys: dict[str, list[str]] = field(default_factory=lambda: {"admin": ["admin"], "team": ["jobs", "predict"]})
    chunk_store: str = "redis"
    bucket: str = "predq-chunks"
    network: Network = field(init=False)
    redis: HostRedis = field(init=False)
    moto: HostMoto | None = field(init=False, default=None)
    api: HostApi = field(init=False)
    beat: ProcfileProcess = field(init=False)
    tokens: dict[str, str] = field(init=False)
    procs: list[_ManagedProcess] = field(init=False, default_factory=list)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def host_a(self) -> Host:
        return self.network.hosts["a"]

    def start(self) -> Cluster:
        self.network = Network()
        try:
            self.network.open()
            for name in ("a", *self.worker_hosts):
                self.network.add_host(name)
            self.redis = HostRedis(self.host_a, dir=self._dir("redis"))
            self.procs.append(self.redis)
            self.redis.start()
            if self.chunk_store == "s3":
                self._start_s3()
            elif self.chunk_store != "redis":
                raise ValueError(f"chunk_store must be 'redis' or 's3', not {self.chunk_store!r}")
            self.tokens = {name: f"pq_{name}_{os.urandom(12).hex()}" for name in self.keys}
            key_file = self.root / "keys.json"
            key_file.write_text(json.dumps({"keys": [
                {"name": name, "sha256": _sha256(self.tokens[name]), "scopes": scopes}
                for name, scopes in self.keys.items()]}))
            self.api = HostApi(self.host_a, self.redis.url, models_dir=self.models_dir,
                               env={**self.settings, "API_KEYS_FILE": str(key_file)}, log_dir=self._dir("api"))
            self.procs.append(self.api)
            self.beat = procfile_beat(self.host_a, self.redis.url, self.models_dir, env=self.settings,
                                      log_dir=self._dir("beat"))
            self.procs.append(self.beat)
            self.beat.start(wait_ready=False)
            self.api.start()
            self.beat.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _start_s3(self) -> None:
        """moto on host a, the bucket made, and every process's settings given the store and how to reach it."""
        self.moto = HostMoto(self.host_a, log_dir=self._dir("moto"))
        self.procs.append(self.moto)
        self.moto.start()
        self.s3().mkdir(self.bucket)
        self.settings = {**self.settings, "CHUNK_STORE_URL": self.chunk_store_url,
                         "AWS_ENDPOINT_URL": self.moto.url, "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def chunk_store_url(self) -> str | None:
        return f"s3://{self.bucket}/chunks" if self.chunk_store == "s3" else None

    def s3(self):
        """A fresh s3fs filesystem on host a's moto (for this process: it reaches host a over the bridge)."""
        import fsspec

        assert self.moto is not None, "this cluster keeps its chunk blobs in Redis"
        return fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=self.moto.url, key="testing",
                                 secret="testing")

    def objects(self, job_id: str) -> dict[str, int]:
        """The objects of a job in the bucket, by name under `<job id>/`, with their sizes in bytes."""
        base = f"{self.bucket}/chunks/{job_id}"
        fs = self.s3()
        if not fs.exists(base):
            return {}
        return {path[len(base) + 1:]: info["size"] for path, info in fs.find(base, detail=True).items()}

    def _dir(self, name: str) -> str:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def worker(self, host: str, models_dir: str, *, start: bool = True, **env: str) -> ProcfileProcess:
        """The Procfile's worker on `host`, told only REDIS_URL, its MODELS_DIR and the cluster's settings."""
        proc = procfile_worker(self.network.hosts[host], self.redis.url, models_dir,
                               env={**self.settings, **env}, log_dir=self._dir(f"worker-{host}"))
        self.procs.append(proc)
        if start:
            proc.start(wait_ready=False)
        return proc

    def wait_consuming(self, workers: list[ProcfileProcess], timeout: float = 90) -> None:
        """Until each worker is ready and its canary task has run (it takes tasks from its queues)."""
        for proc in workers:
            proc.wait_ready(timeout)
        r = self.redis.client()
        try:
            wait_for(lambda: all(r.hexists(keys.WORKER_CANARIES, p.name) for p in workers), timeout=timeout,
                     what="a canary to run on every worker")
        finally:
            r.close()

    def headers(self, key: str = "team") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[key]}"}

    def stop_worker(self, proc: ProcfileProcess) -> None:
        """SIGKILL the worker's process group (a graceful stop could wait on a host that was cut off)."""
        proc.kill(signal.SIGKILL)

    def close(self) -> None:
        """Kill every process by its process group, then remove the network; the first error is raised at the end."""
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.kill(signal.SIGKILL)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(exc)
        try:
            self.network.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        if errors:
            raise errors[0]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
