"""A Milvus standalone server on this machine (tests, benchmarks, trying a server out), from the PyPI `milvus`
package, that asks for credentials (docs/milvus.md says what it exposes)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import MilvusStoreError
from ..format import PathLike, write_json
from .store import import_pymilvus, milvus_errors, one_line, quiet_pymilvus

# The components of a standalone server, whose advertised address `LocalMilvusServer` pins to 127.0.0.1.
_SERVER_COMPONENTS = ("proxy", "rootCoord", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
ROOT_USER, DEFAULT_ROOT_PASSWORD = "root", "Milvus"  # Milvus's built-in user and the password it starts with
SETTINGS_FILE = "decd-server.json"  # in the data folder (mode 600): the password, etcd's root path and ports
ETCD_CONFIG_FILE = "decd-etcd.yaml"  # in the data folder: the embedded etcd's addresses (written from SETTINGS_FILE)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalMilvusServer:
    """A Milvus standalone server from the PyPI package `milvus` (`milvus-server`: the server with its own etcd and
    local storage), with its data, logs and unpacked binaries in `data_dir` (made private to this user).

    It asks for credentials: `start` replaces the built-in root password with one generated for this data folder
    (kept in SETTINGS_FILE, so a restart finds it) before it returns, and `token` ("root:PASSWORD") is what this
    package's clients pass (`--token`, $DECD_MILVUS_TOKEN, `token=`). What else it closes, and what Milvus 2.3
    still exposes: docs/milvus.md, "The server `LocalMilvusServer` starts, and what it exposes".

    `start` waits until the server answers a client (`uri`), and raises MilvusStoreError with the log's tail if it exits
    or does not answer within `start_timeout` seconds; `stop` ends it by its own process id. Also a context manager.
    """

    def __init__(self, data_dir: PathLike, port: Optional[int] = None, start_timeout: float = 180.0):
        self.data_dir, self.port, self.start_timeout = Path(data_dir), port, start_timeout
        self.process: Optional[subprocess.Popen] = None
        self._saved: Optional[dict] = None  # SETTINGS_FILE's content

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """"root:PASSWORD": the credentials of this server's root user, generated for its data folder."""
        return f"{ROOT_USER}:{self._settings()['password']}"

    def command(self) -> list[str]:
        """The launcher's command line: nothing secret in it (any user of the machine can read a command line)."""
        script = shutil.which("milvus-server", path=os.path.dirname(sys.executable)) or shutil.which("milvus-server")
        if script is None:
            raise MilvusStoreError("milvus-server is not installed next to this Python: pip install 'decd[milvus]' "
                                   "(the PyPI package milvus)")
        extra = [argument for component in _SERVER_COMPONENTS
                 for argument in ("--extra-config", f"{component}.ip=127.0.0.1")]
        return [script, "--data", str(self.data_dir), "--proxy-port", str(self.port), *extra]

    def environment(self) -> dict:
        """The server's settings that are secret or that the launcher's template lacks, as the environment variables
        Milvus reads over its configuration file (a process's environment is readable by its own user only)."""
        return dict(os.environ, COMMON_SECURITY_AUTHORIZATIONENABLED="true", PROXY_HTTP_ENABLED="false",
                    ETCD_ROOTPATH=self._settings()["etcd_root_path"],
                    ETCD_CONFIG_PATH=str(self.data_dir / ETCD_CONFIG_FILE))

    def _settings(self) -> dict:
        """This data folder's password, etcd root path and etcd ports: generated on its first start, then read from
        SETTINGS_FILE (mode 600)."""
        if self._saved is None:
            if (path := self.data_dir / SETTINGS_FILE).is_file():
                self._saved = json.loads(path.read_text())
            elif (self.data_dir / "data").exists():
                raise MilvusStoreError(
                    f"{self.data_dir} holds a Milvus server's data but no {SETTINGS_FILE}: a server started without "
                    f"credentials (by hand, or by an older decd); start this one in a new folder")
            else:
                self._saved = dict(password=secrets.token_urlsafe(24), etcd_root_path="decd_" + secrets.token_hex(16),
                                   etcd_client_port=_free_port(), etcd_peer_port=_free_port(), password_set=False)
        return self._saved

    def _save_settings(self) -> None:
        write_json(self.data_dir / SETTINGS_FILE, self._saved, private=True)
        client, peer = self._saved["etcd_client_port"], self._saved["etcd_peer_port"]
        # The embedded etcd on 127.0.0.1 and ports of its own (Milvus's defaults, 2379 and 2380, let one server run).
        (self.data_dir / ETCD_CONFIG_FILE).write_text(
            f"name: default\nlisten-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\nlisten-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\ninitial-cluster: default=http://127.0.0.1:{peer}\n")

    def start(self) -> "LocalMilvusServer":
        if self.process is not None:
            return self
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # its data, logs, password and configuration are this user's only
        self._settings()
        self._save_settings()
        with open(self.data_dir / "server.log", "w") as log:  # a session of its own: `stop` can end its children too
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.environment())
        deadline = time.monotonic() + self.start_timeout
        pymilvus = import_pymilvus(self.uri)
        reason = "it did not open its port"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise MilvusStoreError(f"the Milvus server exited with status {code} while starting; log tail: "
                                       f"{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                with quiet_pymilvus():
                    if not self._saved["password_set"]:
                        self._set_password(pymilvus)
                    with self._client(pymilvus, self.token) as client:
                        client.list_collections()
                return self
            except (OSError, *milvus_errors(pymilvus)) as error:
                reason = one_line(error)
                time.sleep(0.5)
        self.stop()
        raise MilvusStoreError(f"the Milvus server did not answer on {self.uri} within {self.start_timeout:g} s "
                               f"({reason}); log tail: {self.log_tail()}")

    def _set_password(self, pymilvus) -> None:
        """A new server: the generated password replaces the built-in one, which anyone who reaches the port can use
        until then (on an empty server); root must then be the only user (none was added meanwhile)."""
        with self._client(pymilvus, f"{ROOT_USER}:{DEFAULT_ROOT_PASSWORD}") as client:
            client.update_password(ROOT_USER, DEFAULT_ROOT_PASSWORD, self._saved["password"])
        self._saved["password_set"] = True
        self._save_settings()
        with self._client(pymilvus, self.token) as client:
            users = list(client.list_users())
        if users != [ROOT_USER]:
            self.stop()
            raise MilvusStoreError(f"the new Milvus server in {self.data_dir} has the users {', '.join(users)}, where "
                                   f"only {ROOT_USER} should be (someone reached its port before its password was "
                                   f"set); it was stopped: delete that folder, and start it on a machine whose ports "
                                   f"others cannot reach")

    def _client(self, pymilvus, token: str):
        """A client of this server with `token`, closed when the `with` block ends."""
        return contextlib.closing(pymilvus.MilvusClient(uri=self.uri, token=token, timeout=5))

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

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of each socket the milvus binary listens on, from /proc (Linux): what it exposes, with
        '0.0.0.0' or '::' for every interface; [] when it does not run."""
        import ipaddress

        if (pid := self.server_pid()) is None:
            return []
        targets = []
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                targets.append(os.readlink(descriptor))
        sockets = {target[len("socket:["):-1] for target in targets if target.startswith("socket:[")}
        found = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                if (fields := line.split())[3] != "0A" or fields[9] not in sockets:  # 0A: LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # each 32-bit word in the host's (little-endian) order
                raw = b"".join(raw[start:start + 4][::-1] for start in range(0, len(raw), 4))
                found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
        return sorted(found, key=lambda item: item[1])

    def metrics_port(self) -> Optional[int]:
        """The port of the server's metrics and health endpoints (/metrics, /healthz), which the launcher chooses."""
        pid = self.server_pid()
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if pid is not None else []
        return next((int(entry.split(b"=", 1)[1]) for entry in entries if entry.startswith(b"METRICS_PORT=")), None)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the launcher's output and of the server's stderr, on one line each joined by ' | '."""
        tail = []
        for name in ("server.log", "logs/milvus-stderr.log"):
            if (path := self.data_dir / name).is_file():
                tail += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
        return " | ".join(tail) or "(no log)"

    def stop(self) -> None:
        """SIGINT to the launcher (it stops the server), then SIGKILL to its session if it is still there."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # the launcher's session: its id is the launcher's own pid
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def __enter__(self) -> "LocalMilvusServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
