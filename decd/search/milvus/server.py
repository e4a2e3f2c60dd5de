"""A Milvus standalone server on this machine, on 127.0.0.1 (tests, benchmarks, trying a server out), from
the PyPI `milvus` package."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import MilvusStoreError
from ..format import PathLike
from .store import import_pymilvus, one_line, quiet_pymilvus

# --------------------------------------------------------------------------------------------
# A standalone server on this machine (tests, benchmarks, trying a server out)
# --------------------------------------------------------------------------------------------

# The components of a standalone server, whose advertised address `LocalMilvusServer` pins to 127.0.0.1.
_SERVER_COMPONENTS = ("proxy", "rootCoord", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalMilvusServer:
    """A Milvus standalone server from the PyPI package `milvus` (`milvus-server`: the server with its own
    etcd and local storage), with its data, logs and unpacked binaries in `data_dir`.

    Every component's advertised address is 127.0.0.1, so nothing is announced beyond this machine. `start`
    waits until the server answers a client (`uri`), and raises MilvusStoreError with the log's tail if it
    exits or does not answer within `start_timeout` seconds; `stop` ends it by its own process id. Also a
    context manager.
    """

    def __init__(self, data_dir: PathLike, port: Optional[int] = None, start_timeout: float = 180.0):
        self.data_dir = Path(data_dir)
        self.port = port
        self.start_timeout = start_timeout
        self.process: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        script = shutil.which("milvus-server", path=os.path.dirname(sys.executable)) or shutil.which("milvus-server")
        if script is None:
            raise MilvusStoreError("milvus-server is not installed next to this Python: pip install 'decd[milvus]' "
                                   "(the PyPI package milvus)")
        extra = [argument for component in _SERVER_COMPONENTS
                 for argument in ("--extra-config", f"{component}.ip=127.0.0.1")]
        return [script, "--data", str(self.data_dir), "--proxy-port", str(self.port), *extra]

    def start(self) -> "LocalMilvusServer":
        if self.process is not None:
            return self
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "w")
        try:  # a session of its own: `stop` can end the server's child processes with it
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        pymilvus = import_pymilvus(self.uri)
        reason = "it did not open its port"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise MilvusStoreError(f"the Milvus server exited with status {code} while starting; log tail: "
                                       f"{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                with quiet_pymilvus():
                    client = pymilvus.MilvusClient(uri=self.uri, timeout=5)
                    client.list_collections()
                    client.close()
                return self
            except (OSError, pymilvus.exceptions.MilvusException) as error:
                reason = one_line(error)
                time.sleep(0.5)
        self.stop()
        raise MilvusStoreError(f"the Milvus server did not answer on {self.uri} within {self.start_timeout:g} s "
                               f"({reason}); log tail: {self.log_tail()}")

    def server_pid(self) -> Optional[int]:
        """The process id of the milvus binary (a child of the `milvus-server` launcher), for its memory."""
        if self.process is None:
            return None
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # a process that ended meanwhile
            if int(fields[1]) == self.process.pid:  # the parent's id follows the state
                return int(status.parent.name)
        return None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the launcher's output and of the server's stderr, on one line each joined by ' | '."""
        tail = []
        for name in ("server.log", "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.is_file():
                tail += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
        return " | ".join(tail) or "(no log)"

    def stop(self) -> None:
        """SIGINT to the launcher (it stops the server), then SIGKILL to its session if it is still there."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # the launcher's session: its id is the launcher's own process id
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def __enter__(self) -> "LocalMilvusServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
