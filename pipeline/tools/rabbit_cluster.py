"""A local RabbitMQ cluster on loopback for the tests and for trying the partitioned source: Debian's
`rabbitmq-server` (3.10), N nodes with the MQTT and consistent-hash plugins, every port on 127.0.0.1.

Each node gets its own folder (data, logs, config: deploy/rabbitmq/rabbitmq.conf with the ports
filled in), the nodes share one Erlang cookie and one epmd started here on loopback (RabbitMQ would
otherwise start its own on every interface), and nodes 2..N join node 1.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.tools.broker import BrokerError, free_port

log = logging.getLogger(__name__)

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian: the real scripts (/usr/sbin ones switch user and folder)
CONF_TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "rabbitmq.conf"
PLUGINS = "[rabbitmq_mqtt,rabbitmq_consistent_hash_exchange,rabbitmq_event_exchange]."


@dataclass(frozen=True)
class RabbitNode:
    name: str  # Erlang node name, rabbit<k>@localhost
    amqp_port: int
    mqtt_port: int
    dist_port: int
    folder: Path


class RabbitCluster:
    """`nodes` RabbitMQ nodes on 127.0.0.1, clustered; `nodes[k].amqp_port` / `.mqtt_port` to connect."""

    def __init__(self, nodes: int = 3, conf: str | None = None) -> None:
        """`conf`: each node's rabbitmq.conf, with {host}, {amqp_port} and {mqtt_port} to fill in (default:
        deploy/rabbitmq/rabbitmq.conf, plain TCP and guest)."""
        self._conf = CONF_TEMPLATE.read_text() if conf is None else conf
        self._dir = Path(tempfile.mkdtemp(prefix="ecgmon-rabbit-"))
        self.host = "127.0.0.1"
        self.epmd_port = free_port()
        self.nodes = self._new_nodes(nodes)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        (self._dir / "home").mkdir()
        cookie = self._dir / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)

    def _new_nodes(self, n: int) -> list[RabbitNode]:
        return [RabbitNode(f"rabbit{k}@localhost", free_port(), free_port(), free_port(), self._dir / f"n{k}")
                for k in range(1, n + 1)]

    def _env(self, node: RabbitNode | None = None) -> dict[str, str]:
        env = {**os.environ, "HOME": str(self._dir / "home"), "ERL_EPMD_PORT": str(self.epmd_port),
               "RABBITMQ_CONF_ENV_FILE": "/dev/null"}
        if node is not None:
            env.update({
                "RABBITMQ_NODENAME": node.name, "RABBITMQ_NODE_IP_ADDRESS": self.host,
                "RABBITMQ_NODE_PORT": str(node.amqp_port), "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.folder / "mnesia"), "RABBITMQ_LOG_BASE": str(node.folder / "log"),
                "RABBITMQ_CONFIG_FILE": str(node.folder / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.folder / "enabled_plugins"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.folder / "plugins"),
                "RABBITMQ_PID_FILE": str(node.folder / "rabbit.pid"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.folder / "advanced.config"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"})
        return env

    def ctl_command(self, node: RabbitNode) -> tuple[list[str], dict[str, str]]:
        """`rabbitmqctl -n <node>`, and the environment it needs (the cluster's cookie and epmd)."""
        return [str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name], self._env()

    def ctl(self, node: RabbitNode, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`rabbitmqctl -n <node> args...`."""
        command, env = self.ctl_command(node)
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout_s)

    def start(self, timeout_s: float = 120.0, attempts: int = 2) -> RabbitCluster:
        """Start and join the nodes. A port picked free can be taken by another process before its node opens it:
        then the cluster is started again on fresh ports, up to `attempts` times."""
        for _ in range(attempts - 1):
            try:
                return self._start(timeout_s)
            except BrokerError as err:
                log.warning("RabbitMQ cluster start failed (%s); again on fresh ports", str(err)[-200:])
                self._stop_nodes()
                for node in self.nodes:
                    shutil.rmtree(node.folder, ignore_errors=True)
                self.epmd_port = free_port()
                self.nodes = self._new_nodes(len(self.nodes))
        try:
            return self._start(timeout_s)
        except BrokerError:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> RabbitCluster:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise BrokerError("rabbitmq-server not found: install it (Debian: apt-get install rabbitmq-server)")
        epmd = next(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None)
        if epmd is None:
            raise BrokerError("epmd (Erlang) not found")
        subprocess.run([str(epmd), "-port", str(self.epmd_port), "-address", self.host, "-daemon"], check=True,
                       env=self._env())
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.await_node(node, timeout_s)
        for node in self.nodes[1:]:
            for step in (("stop_app",), ("join_cluster", self.nodes[0].name), ("start_app",)):
                result = self.ctl(node, *step)
                if result.returncode:
                    raise BrokerError(f"{node.name} {step[0]}: {result.stderr[-500:]}")
        log.info("RabbitMQ cluster of %d up: AMQP %s, MQTT %s", len(self.nodes),
                 [n.amqp_port for n in self.nodes], [n.mqtt_port for n in self.nodes])
        return self

    def start_node(self, node: RabbitNode) -> None:
        """Launch one node (its data kept from an earlier run, if any); `await_node` waits for it."""
        (node.folder / "log").mkdir(parents=True, exist_ok=True)
        conf = self._conf.format(host=self.host, amqp_port=node.amqp_port, mqtt_port=node.mqtt_port)
        (node.folder / "rabbitmq.conf").write_text(conf)
        (node.folder / "enabled_plugins").write_text(PLUGINS)
        with (node.folder / "stdout.log").open("ab") as out:
            self._processes[node.name] = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self._env(node),
                                                          stdout=out, stderr=subprocess.STDOUT,
                                                          start_new_session=True)

    def await_node(self, node: RabbitNode, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ctl(node, "await_startup", "--timeout", "5", timeout_s=30).returncode == 0:
                return
            process = self._processes.get(node.name)
            if process is not None and process.poll() is not None:
                raise BrokerError(f"{node.name} exited: {(node.folder / 'stdout.log').read_text()[-800:]}")
            time.sleep(0.5)
        raise BrokerError(f"{node.name} not up within {timeout_s:g} s")

    def cpu_s(self, node: RabbitNode) -> float:
        """CPU time (s, user + system) of the node's live processes (its session: the Erlang VM and helpers)."""
        process = self._processes.get(node.name)
        if process is None:
            return 0.0
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[3]) == process.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def kill_node(self, node: RabbitNode) -> None:
        """kill -9 the node's whole process group (the Erlang VM and its helpers)."""
        process = self._processes.pop(node.name, None)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """Stop every node and the epmd, remove the folder."""
        self._stop_nodes()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_nodes(self) -> None:
        for node in self.nodes:
            if node.name in self._processes:
                self.ctl(node, "stop", timeout_s=60)
                self.kill_node(node)
        subprocess.run(["pkill", "-f", f"epmd -port {self.epmd_port}"], check=False)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
