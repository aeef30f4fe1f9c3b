#!/usr/bin/env python3
"""Start and stop a local Apache Flink cluster that runs the DELG job with --runner=FlinkRunner.

    python scripts/flink_cluster.py start           # a JobManager and 2 TaskManagers on loopback
    python scripts/flink_cluster.py flags           # the Beam flags that send a job to it
    python -m beam_job --input 'photos/*.jpg' --output out/flink $(python scripts/flink_cluster.py flags)
    python scripts/flink_cluster.py stop

Everything comes from package registries and is cached (docs/flink.md): the Flink distribution is the jar
folder of the PyPI sdist `apache-flink-libraries` (downloaded with pip, unpacked, never installed: PyFlink
pins an older apache-beam), and Beam's Flink job server is built with Maven from `flink/pom.xml` (Maven
Central serves the runner library but not Beam's prebuilt job-server jar). Both land in the cache folder
(`$DELG_FLINK_CACHE`, default ~/.cache/delg-beam/flink) and are reused by later starts; Maven keeps its own
download cache in ~/.m2.

The processes are plain `java` commands, each in its own process group, their ids kept in
`<dir>/cluster.json`, so that a test (or a person) can SIGKILL one TaskManager or one SDK worker and see
Flink recover. Flink restarts failed work with a fixed-delay restart strategy (`--restart-attempts`).
SDK workers are Beam's PROCESS environment: each TaskManager starts its own Python workers, as its children,
through `<dir>/sdk-worker`, a two-line script written here that runs `beam_job.pipeline.worker_boot` with
this Python (so with the job's packages). Why not one EXTERNAL worker pool: docs/flink.md.

Standard library only (and `beam_job.processes`, which is too): the script runs before any of the project's
requirements are imported.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from beam_job.processes import process_alive  # noqa: E402  (standard library only, like this script)

POM = os.path.join(ROOT, "flink", "pom.xml")

# The Flink minor version is the one the job-server build targets (flink/pom.xml: beam-runners-flink-1.19);
# the patch version is the newest apache-flink-libraries 1.19.x on PyPI. Beam's FlinkRunner is told the
# minor version with --flink_version.
FLINK_VERSION = "1.19.3"
FLINK_MINOR = "1.19"
FLINK_SDIST = "apache-flink-libraries"

DEFAULT_DIR = os.path.join(ROOT, ".flink")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "delg-beam", "flink")


class ClusterError(RuntimeError):
    """The cluster could not be prepared or started; the message says what failed and where its log is."""


# --------------------------------------------------------------------------------------------- artifacts


def cache_dir() -> str:
    return os.environ.get("DELG_FLINK_CACHE") or DEFAULT_CACHE


def flink_home(cache: str | None = None) -> str:
    """A Flink distribution's lib/ folder, unpacked once from the PyPI sdist into the cache."""
    home = os.path.join(cache or cache_dir(), f"flink-{FLINK_VERSION}")
    if os.path.exists(os.path.join(home, "lib", f"flink-dist-{FLINK_VERSION}.jar")):
        return home
    downloads = os.path.join(cache or cache_dir(), "downloads")
    os.makedirs(downloads, exist_ok=True)
    sdists = glob.glob(os.path.join(downloads, f"apache-flink-libraries-{FLINK_VERSION}.tar.gz"))
    if not sdists:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", downloads,
              f"{FLINK_SDIST}=={FLINK_VERSION}"], "downloading the Flink distribution from PyPI")
        sdists = glob.glob(os.path.join(downloads, f"apache-flink-libraries-{FLINK_VERSION}.tar.gz"))
    if not sdists:
        raise ClusterError(f"pip download of {FLINK_SDIST}=={FLINK_VERSION} left no sdist in {downloads}")
    partial = home + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    # deps/lib: the distribution's jars; deps/bin/bash-java-utils.jar: what Flink's start scripts use to turn
    # the memory settings into JVM flags and the TaskManager's resource settings (see _memory_args).
    prefix = f"apache-flink-libraries-{FLINK_VERSION}/deps/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and (
            m.name.startswith(prefix + "lib/") or m.name == prefix + "bin/bash-java-utils.jar")]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(partial, members=members, filter="data")
    if not os.path.exists(os.path.join(partial, "lib", f"flink-dist-{FLINK_VERSION}.jar")):
        raise ClusterError(f"{sdists[0]} holds no lib/flink-dist-{FLINK_VERSION}.jar")
    shutil.rmtree(home, ignore_errors=True)
    os.replace(partial, home)
    return home


def job_server_jar(cache: str | None = None) -> str:
    """Beam's Flink job server, built from flink/pom.xml once per version of that file."""
    digest = hashlib.sha256()
    for source in [POM, *sorted(glob.glob(os.path.join(ROOT, "flink", "src", "**"), recursive=True))]:
        if os.path.isfile(source):
            with open(source, "rb") as fh:
                digest.update(fh.read())
    digest = digest.hexdigest()[:12]
    jar = os.path.join(cache or cache_dir(), f"beam-flink-job-server-{digest}.jar")
    if os.path.exists(jar):
        return jar
    if not shutil.which("mvn"):
        raise ClusterError("Maven (mvn) is needed once to build Beam's Flink job server: install maven")
    # A fresh target/ each time: the shade step would otherwise take a jar it shaded before as its input.
    shutil.rmtree(os.path.join(ROOT, "flink", "target"), ignore_errors=True)
    _run(["mvn", "-q", "-B", "-f", POM, "package"], "building Beam's Flink job server with Maven")
    built = os.path.join(ROOT, "flink", "target", "beam-flink-job-server.jar")
    os.makedirs(os.path.dirname(jar), exist_ok=True)
    shutil.copyfile(built, jar + ".partial")
    os.replace(jar + ".partial", jar)
    return jar


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise ClusterError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


# ----------------------------------------------------------------------------------------------- cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(host: str, bind: str, rest_port: int, rpc_port: int, slots: int, attempts: int,
            workdir: str) -> dict[str, str]:
    """Flink settings: the JobManager at `host`, listening on `bind`, small memory, quick loss detection,
    fixed-delay restarts."""
    return {
        "jobmanager.rpc.address": host,
        "jobmanager.rpc.port": str(rpc_port),
        "jobmanager.bind-host": bind,
        "rest.address": host,
        "rest.bind-address": bind,  # Flink's default is every interface
        "rest.port": str(rest_port),
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "taskmanager.rpc.port": "0",
        "taskmanager.data.port": "0",
        "blob.server.port": "0",
        "taskmanager.numberOfTaskSlots": str(slots),
        "jobmanager.memory.process.size": "768m",
        "taskmanager.memory.process.size": "1280m",
        "taskmanager.memory.managed.size": "64m",
        # Beam's batch plan on Flink has many shuffles between few slots: 256 MB of 32 KB network buffers.
        "taskmanager.memory.network.min": "256m",
        "taskmanager.memory.network.max": "256m",
        "cluster.evenly-spread-out-slots": "true",  # one subtask per TaskManager: killing one hits running work
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": str(attempts),
        "restart-strategy.fixed-delay.delay": "2 s",
        # A SIGKILLed TaskManager is noticed when its connections drop; the heartbeat is the fallback.
        "heartbeat.interval": "2000",
        "heartbeat.timeout": "15000",
        "io.tmp.dirs": os.path.join(workdir, "tmp"),
        "web.tmpdir": os.path.join(workdir, "tmp"),
        "blob.storage.directory": os.path.join(workdir, "tmp"),
    }


_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
"""


def _spawn(cmd: list[str], log: str, env: dict[str, str] | None = None) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=os.path.dirname(log))
    return proc.pid


def _java_binary() -> str:
    java = shutil.which("java")
    if not java:
        raise ClusterError("Java 11 or 17 is needed for Flink: install a JDK (java on PATH)")
    return java


def _memory_args(home: str, workdir: str, role: str) -> list[str]:
    """JVM flags and dynamic settings for a JobManager ("JM") or TaskManager ("TM") from the memory settings in
    config.yaml, computed by Flink's own BashJavaUtils as its start scripts do (a TaskManager refuses to
    start without the resource settings it derives)."""
    classpath = os.pathsep.join([os.path.join(home, "bin", "bash-java-utils.jar"), os.path.join(home, "lib", "*")])
    proc = subprocess.run([_java_binary(), "-cp", classpath, "org.apache.flink.runtime.util.bash.BashJavaUtils",
                           f"GET_{role}_RESOURCE_PARAMS", "--configDir", os.path.join(workdir, "conf")],
                          capture_output=True, text=True)
    results = [line.split(":", 1)[1] for line in proc.stdout.splitlines()
               if line.startswith("BASH_JAVA_UTILS_EXEC_RESULT:")]
    if proc.returncode or len(results) != 2:
        raise ClusterError(f"Flink's BashJavaUtils could not size the {role} memory: "
                           + (proc.stdout + proc.stderr).strip()[-500:])
    jvm, dynamic = results
    return [*jvm.split(), "\0", *dynamic.split()]


def _java(home: str, workdir: str, name: str, main: str, role: str, *args: str) -> list[str]:
    jvm_and_dynamic = _memory_args(home, workdir, role)
    cut = jvm_and_dynamic.index("\0")
    return [_java_binary(), *jvm_and_dynamic[:cut], f"-Dlog.file={os.path.join(workdir, 'log', name + '.log')}",
            f"-Dlog4j.configurationFile=file:{os.path.join(workdir, 'conf', 'log4j.properties')}",
            "-cp", os.path.join(home, "lib", "*"), main, "--configDir", os.path.join(workdir, "conf"),
            *jvm_and_dynamic[cut + 1:], *args]


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # the cluster's REST API, on this machine
        return json.load(resp)


def start(workdir: str = DEFAULT_DIR, taskmanagers: int = 2, slots: int = 2, rest_port: int = 0,
          restart_attempts: int = 3, env: dict[str, str] | None = None, timeout: float = 180.0,
          hosts=False) -> dict:
    """Start the cluster; returns the state also written to <workdir>/cluster.json. `env`: extra variables
    for every SDK worker. `hosts`: True (or the result of make_hosts, to start a server on the hosts' gateway
    first) puts every TaskManager in a network namespace of its own (root needed); the JobManager then listens
    on the hosts' bridge, not on loopback."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(os.path.join(workdir, "cluster.json")):
        state = load(workdir)
        if any(process_alive(pid) for pid in _pids(state)):
            raise ClusterError(f"a cluster from {workdir} is running: stop it first (flink_cluster.py stop)")
    home, jar = flink_home(), job_server_jar()
    for sub in ("conf", "log", "tmp"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    network = hosts if isinstance(hosts, dict) else make_hosts(taskmanagers) if hosts else None
    # On hosts of their own, the JobManager listens on every interface of its namespace (its loopback too:
    # Flink's REST handlers reach the blob server at localhost) and is reached at its bridge address.
    host, bind = (network["hosts"]["jobmanager"][1], "0.0.0.0") if network else ("127.0.0.1", "127.0.0.1")
    rest_port, rpc_port = rest_port or free_port(), free_port()
    config = _config(host, bind, rest_port, rpc_port, slots, restart_attempts, workdir)
    with open(os.path.join(workdir, "conf", "config.yaml"), "w") as fh:
        fh.writelines(f"{key}: {json.dumps(value)}\n" for key, value in config.items())
    with open(os.path.join(workdir, "conf", "log4j.properties"), "w") as fh:
        fh.write(_LOG4J)

    state: dict = {"workdir": workdir, "flink_home": home, "job_server_jar": jar, "host": host,
                   "rest_port": rest_port, "sdk_worker": _write_worker_command(workdir, env), "slots": slots,
                   "network": network, "owns_network": network is not None and not isinstance(hosts, dict),
                   "jobmanager": None, "taskmanagers": {}}
    _save(state)  # from here on, stop() can undo what was made
    try:
        main = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
        command = _java(home, workdir, "jobmanager", main, "JM")
        if network:
            command = ["ip", "netns", "exec", network["hosts"]["jobmanager"][0], *command]
        state["jobmanager"] = _spawn(command, os.path.join(workdir, "log", "jobmanager.out"))
        for i in range(1, taskmanagers + 1):
            state["taskmanagers"][f"tm-{i}"] = start_taskmanager(state, f"tm-{i}")
        _save(state)
        wait_ready(state, taskmanagers, timeout)
    except BaseException:
        stop(workdir, quiet=True)
        raise
    return state


def start_taskmanager(state: dict, name: str) -> int:
    """Start (or restart) one TaskManager of a running cluster; returns its pid."""
    workdir, network = state["workdir"], state.get("network")
    where: list[str] = []
    if network:  # its own host: its namespace, its address on the bridge
        namespace, address = network["hosts"][name]
        where = ["-D", f"taskmanager.host={address}", "-D", "taskmanager.bind-host=0.0.0.0"]
    command = _java(state["flink_home"], workdir, name, "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
                    "TM", "-D", f"taskmanager.resource-id={name}", *where)
    if network:
        command = ["ip", "netns", "exec", namespace, *command]  # ip execs the command: the pid is the JVM's
    pid = _spawn(command, os.path.join(workdir, "log", name + ".out"))
    state["taskmanagers"][name] = pid
    _save(state)
    return pid


def _write_worker_command(workdir: str, extra: dict[str, str] | None) -> str:
    """<workdir>/sdk-worker: what a TaskManager runs for each SDK worker (Beam's PROCESS environment)."""
    env = {"PYTHONPATH": ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.update(extra or {})
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))
    path = os.path.join(workdir, "sdk-worker")
    with open(path, "w") as fh:
        fh.write(f"#!/bin/sh\n# A Beam SDK worker for this cluster's TaskManagers (flink_cluster.py).\n{exports}"
                 f"exec {shlex.quote(sys.executable)} -m beam_job.pipeline.worker_boot \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def wait_ready(state: dict, taskmanagers: int, timeout: float) -> None:
    """Until the REST API lists `taskmanagers` TaskManagers."""
    deadline = time.monotonic() + timeout
    url = f"http://{state['host']}:{state['rest_port']}/taskmanagers"
    while True:
        dead = [name for name, pid in [("jobmanager", state["jobmanager"]), *state["taskmanagers"].items()]
                if not process_alive(pid)]
        if dead:
            raise ClusterError(f"{dead[0]} exited at start: see {os.path.join(state['workdir'], 'log')}")
        try:
            registered = len(_get_json(url)["taskmanagers"])
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            registered = -1
        if registered >= taskmanagers:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"the cluster was not ready after {timeout:.0f} s ({max(registered, 0)} of "
                               f"{taskmanagers} TaskManagers): see {os.path.join(state['workdir'], 'log')}")
        time.sleep(0.5)


def job_flags(state: dict, parallelism: int | None = None) -> list[str]:
    """The Beam pipeline options that run a job on this cluster."""
    workers = parallelism or len(state["taskmanagers"])
    return [
        "--runner=FlinkRunner",
        f"--flink_master={state['host']}:{state['rest_port']}",
        f"--flink_version={FLINK_MINOR}",
        f"--flink_job_server_jar={state['job_server_jar']}",
        "--environment_type=PROCESS",
        "--environment_config=" + json.dumps({"command": state["sdk_worker"]}, separators=(",", ":")),
        # Keep a TaskManager's SDK workers from one stage of the job to the next (Beam otherwise starts new
        # ones, each importing TensorFlow and loading the model again).
        "--environment_cache_millis=600000",
        f"--parallelism={workers}",
    ]


def _save(state: dict) -> None:
    path = os.path.join(state["workdir"], "cluster.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(state, fh, indent=1)
    os.replace(path + ".tmp", path)


def load(workdir: str = DEFAULT_DIR) -> dict:
    path = os.path.join(os.path.abspath(workdir), "cluster.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ClusterError(f"no cluster state in {path}: start one with flink_cluster.py start") from None


def _pids(state: dict) -> list[int]:
    return [p for p in [*state.get("taskmanagers", {}).values(), state.get("jobmanager")] if p]


def stop(workdir: str = DEFAULT_DIR, quiet: bool = False, grace: float = 10.0) -> None:
    """Stop every process of the cluster (their whole process groups: SDK workers too)."""
    try:
        state = load(workdir)
    except ClusterError:
        if quiet:
            return
        raise
    pids = _pids(state)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(process_alive(p) for p in pids):
            break
    if state.get("network") and state.get("owns_network"):  # hosts made by the caller are the caller's to remove
        remove_hosts(state["network"])
    os.remove(os.path.join(state["workdir"], "cluster.json"))


# ----------------------------------------------------------------------------------- hosts of their own

HOSTS_SUBNET = "10.213"  # 10.213.<n>.0/24: addresses on a bridge that exists only on this machine


def make_hosts(count: int) -> dict:
    """Hosts for a JobManager and `count` TaskManagers: network namespaces `dlg<n>-jobmanager` and
    `dlg<n>-tm-<i>`, each with one veth on a new bridge `dlgbr<n>`, whose own address 10.213.<n>.1 (the
    gateway) is this machine's: the launcher's, and that of any server the hosts must share (a GCS emulator).
    The JobManager is 10.213.<n>.2, TaskManager i 10.213.<n>.<i+2>. A namespace has its own loopback and reaches
    the others only through the bridge: what one host serves on 127.0.0.1 no other host sees. Needs root
    (ip, from iproute2)."""
    if not shutil.which("ip"):
        raise ClusterError("network namespaces need the ip command (Debian package iproute2) and root")
    used = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    n = next((i for i in range(1, 250) if f"dlgbr{i}:" not in used), None)
    if n is None:
        raise ClusterError("no free dlgbr<n> bridge name: remove stale ones with `ip link del dlgbr<n>`")
    network: dict = {"bridge": f"dlgbr{n}", "gateway": f"{HOSTS_SUBNET}.{n}.1", "hosts": {}}
    try:
        _ip("link", "add", network["bridge"], "type", "bridge")
        _ip("addr", "add", f"{network['gateway']}/24", "dev", network["bridge"])
        _ip("link", "set", network["bridge"], "up")
        for i, name in enumerate(["jobmanager", *(f"tm-{j}" for j in range(1, count + 1))]):
            namespace, outside, inside = f"dlg{n}-{name}", f"dlg{n}v{i}", f"dlg{n}p{i}"
            address = f"{HOSTS_SUBNET}.{n}.{i + 2}"
            network["hosts"][name] = (namespace, address)
            _ip("netns", "add", namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", network["bridge"], "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except BaseException:
        remove_hosts(network)
        raise
    return network


def remove_hosts(network: dict) -> None:
    for namespace, _ in network["hosts"].values():
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", network["bridge"]], capture_output=True)  # takes its veths along


def _ip(*args: str) -> None:
    _run(["ip", *args], "setting up the TaskManagers' hosts")


# ------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flink_cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "start", "flags", "status", "stop"))
    parser.add_argument("--dir", default=DEFAULT_DIR, help="the cluster's working folder (default: .flink)")
    parser.add_argument("--taskmanagers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2, help="task slots per TaskManager")
    parser.add_argument("--rest-port", type=int, default=8081, help="Flink's REST port (0: any free port)")
    parser.add_argument("--restart-attempts", type=int, default=3, help="Flink's fixed-delay restart attempts")
    parser.add_argument("--hosts", action="store_true",
                        help="each TaskManager in a network namespace of its own (root; see docs/flink.md)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(flink_home())
            print(job_server_jar())
        elif args.command == "start":
            state = start(args.dir, args.taskmanagers, args.slots, args.rest_port, args.restart_attempts,
                          hosts=args.hosts)
            where = "hosts of their own" if args.hosts else "127.0.0.1"
            print(f"Flink {FLINK_VERSION}: JobManager and {args.taskmanagers} TaskManagers on {where}, web UI "
                  f"http://{state['host']}:{state['rest_port']}, logs in {os.path.join(state['workdir'], 'log')}",
                  file=sys.stderr)
        elif args.command == "flags":
            print(" ".join(job_flags(load(args.dir))))
        elif args.command == "status":
            state = load(args.dir)
            for name, pid in [("jobmanager", state["jobmanager"]), *state["taskmanagers"].items()]:
                print(f"{name:16} pid {pid:<8} {'running' if process_alive(pid) else 'gone'}")
        else:
            stop(args.dir)
    except ClusterError as exc:
        print(f"flink_cluster.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
