"""Start and stop a real, isolated TorchServe 0.12 (Java frontend + Python workers): tests and the demo.

Each `TorchServe` is isolated from every other server on the machine: its own working folder
(logs, key_file.json), its own TMPDIR/TEMP (the pid file `.model_server.pid`, java.io.tmpdir and
the workers' Unix sockets live there) and its own free ports (REST, gRPC, workers, torchrun master).

    with TorchServe(tmp_path / "ts", model_store) as ts:
        ts.start(models={"echo": "echo.mar"})
        ts.wait_ready("echo")
        assert ts.predict("echo", {"x": 1}).status_code == 200
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import psutil
import requests

from .processes import free_ports, kill_process_tree

BIN = Path(sys.executable).parent


class TorchServeError(RuntimeError):
    """TorchServe did not do what a test asked; the message ends with the tail of its logs."""


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"({path.name}: not written)"
    return "\n".join(lines[-n:])


class TorchServe:
    """One real TorchServe, started with `torchserve --start --foreground` in its own session."""

    def __init__(self, workdir: Path, model_store: Path, token_auth: bool = False,
                 extra_env: Optional[Dict[str, str]] = None, properties: Optional[Dict[str, str]] = None):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.token_auth = token_auth
        self.extra_env = dict(extra_env or {})
        self.properties = dict(properties or {})  # more config.properties lines (e.g. metrics_mode)
        self.tmpdir = self.workdir / "tmp"
        self.log_dir = self.workdir / "logs"
        self.config_path = self.workdir / "config.properties"
        self.output_path = self.workdir / "torchserve.out"
        (inference, management, metrics, grpc_inference, grpc_management,
         distribution) = free_ports(6)
        # workers listen on Unix sockets named after their port (in java.io.tmpdir = self.tmpdir)
        self.worker_port = random.randrange(20000, 40000, 100)
        self.distribution_port = distribution
        self.grpc_ports = (grpc_inference, grpc_management)
        self.inference_url = f"http://127.0.0.1:{inference}"
        self.management_url = f"http://127.0.0.1:{management}"
        self.metrics_url = f"http://127.0.0.1:{metrics}"
        self.process: Optional[subprocess.Popen] = None
        self._output = None
        self._keys: Optional[dict] = None

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "TorchServe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
        env.update({
            "TMPDIR": str(self.tmpdir),  # .model_server.pid
            "TEMP": str(self.tmpdir),  # java.io.tmpdir: the workers' socket files
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # torchrun of this environment
        })
        env.update(self.extra_env)
        return env

    def _write_config(self) -> None:
        lines = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_port": self.grpc_ports[0],
            "grpc_management_port": self.grpc_ports[1],
            "initial_worker_port": self.worker_port,
            "initial_distribution_port": self.distribution_port,
            "model_store": self.model_store,
            "default_workers_per_model": 1,
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",
            "enable_envvars_config": "false",
            "enable_model_api": "true",  # register() needs the model control API (off by default in 0.12)
            **self.properties,
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()), encoding="utf-8")

    def start(self, models: Optional[Dict[str, str]] = None, timeout: float = 240) -> None:
        """Start the server (models: name -> archive file name in model_store); return when /ping
        is healthy and every model given here has all its workers READY. /ping stays unhealthy while
        a model lacks minWorkers, so load a model that may never get READY with register() instead."""
        if self.process is not None:
            raise TorchServeError("this TorchServe is already started")
        for folder in (self.workdir, self.tmpdir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._write_config()
        cmd = [str(BIN / "torchserve"), "--start", "--foreground", "--ncs",
               "--model-store", str(self.model_store), "--ts-config", str(self.config_path)]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        if models:
            cmd += ["--models", *(f"{name}={archive}" for name, archive in models.items())]
        self._output = open(self.output_path, "ab")
        # a session of its own: stop() can end the frontend and every worker it started as a group
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdin=subprocess.DEVNULL,
                                        stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            self._wait_healthy(deadline)
            for name in models or {}:
                self.wait_ready(name, timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, deadline: float) -> None:
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TorchServeError(f"torchserve exited with {self.process.returncode} during start-up\n"
                                      + self.log_tail())
            try:
                # with token authorization even /ping needs the inference key, once key_file.json exists
                headers = self._headers() if not self.token_auth or self._key_file(wait=0) else {}
                response = requests.get(f"{self.inference_url}/ping", headers=headers, timeout=5)
                last = f"{response.status_code} {response.text.strip()}"
                if response.status_code == 200 and response.json().get("status") == "Healthy":
                    return
            except (requests.RequestException, ValueError) as err:
                last = repr(err)
            time.sleep(0.5)
        raise TorchServeError(f"/ping not healthy in time (last: {last})\n" + self.log_tail())

    def stop(self) -> None:
        """`torchserve --stop` with this TMPDIR, then make sure the frontend and every worker are gone."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        try:
            subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=self.workdir, env=self._env(),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60, check=False)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_process_tree(process, descendants)
            if self._output is not None:
                self._output.close()
                self._output = None
            self._keys = None

    # --- authorisation ---------------------------------------------------------------------------

    def _key_file(self, wait: float = 30) -> Optional[dict]:
        """key_file.json of this server (written by the frontend at start-up); None if not there in time."""
        if self._keys is None:
            path = self.workdir / "key_file.json"
            deadline = time.monotonic() + wait
            while True:
                try:
                    self._keys = json.loads(path.read_text(encoding="utf-8"))
                    break
                except (OSError, ValueError):  # not written yet, or half written
                    if time.monotonic() >= deadline:
                        return None
                    time.sleep(0.2)
        return self._keys

    def _key(self, kind: str) -> Optional[str]:
        if not self.token_auth:
            return None
        keys = self._key_file()
        if keys is None:
            raise TorchServeError("key_file.json was not written in the working folder\n" + self.log_tail())
        return keys[kind]["key"]

    @property
    def key(self) -> Optional[str]:
        """The inference key (token_auth=True), from key_file.json in the working folder."""
        return self._key("inference")

    @property
    def management_key(self) -> Optional[str]:
        return self._key("management")

    def _headers(self, management: bool = False) -> Dict[str, str]:
        if not self.token_auth:
            return {}
        return {"Authorization": f"Bearer {self.management_key if management else self.key}"}

    # --- management ------------------------------------------------------------------------------

    def register(self, archive: str, name: str, timeout: float = 300, initial_workers: int = 1) -> dict:
        """Register `archive` (a file name in model_store) synchronously; raise with the log tail on failure."""
        params = {"url": archive, "model_name": name, "initial_workers": initial_workers, "synchronous": "true"}
        try:
            response = requests.post(f"{self.management_url}/models", params=params,
                                     headers=self._headers(management=True), timeout=timeout)
        except requests.RequestException as err:
            raise TorchServeError(f"registering {name} from {archive} failed: {err!r}\n" + self.log_tail()) from None
        if response.status_code != 200:
            raise TorchServeError(f"registering {name} from {archive}: {response.status_code} {response.text.strip()}\n"
                                  + self.log_tail())
        return response.json()

    def unregister(self, name: str, timeout: float = 120) -> None:
        """Unregister `name` and wait until its worker processes are gone (killed after `timeout`), so that the
        next model starts on a quiet host."""
        requests.delete(f"{self.management_url}/models/{name}", headers=self._headers(management=True),
                        timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in self.workers().values():
            proc.kill()

    def workers(self) -> Dict[int, psutil.Process]:
        """rank -> process of every model worker under this frontend (torchrun ranks have RANK set; a plain worker
        is rank 0): the ranks of one model when one is registered."""
        ranks: Dict[int, psutil.Process] = {}
        try:
            procs = psutil.Process(self.process.pid).children(recursive=True) if self.process else []
        except psutil.Error:
            return ranks
        for proc in procs:
            try:
                cmdline = proc.cmdline()
                if not any(arg.endswith("model_service_worker.py") for arg in cmdline) or torchrun_agent(cmdline):
                    continue  # java, torchrun agents (their arguments name the worker script too)
                ranks[int(proc.environ().get("RANK", 0))] = proc
            except psutil.Error:
                continue
        return ranks

    def describe(self, name: str) -> list:
        response = requests.get(f"{self.management_url}/models/{name}", headers=self._headers(management=True),
                                timeout=30)
        response.raise_for_status()
        return response.json()

    def worker_pid(self, name: str) -> Optional[int]:
        """The pid the frontend gives model `name`'s worker while it is READY, else None."""
        workers = self.describe(name)[0]["workers"]
        return workers[0]["pid"] if workers and all(w["status"] == "READY" for w in workers) else None

    def wait_ready(self, name: str, timeout: float = 300) -> None:
        """Return when every worker of `name` is READY (and at least minWorkers exist), else raise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise TorchServeError(f"torchserve is not running while waiting for {name}\n" + self.log_tail())
            try:
                versions = self.describe(name)
                last = json.dumps(versions)[:2000]
                if versions and all(
                        len(v.get("workers", [])) >= max(1, v.get("minWorkers", 1))
                        and all(w.get("status") == "READY" for w in v["workers"]) for v in versions):
                    return
            except (requests.RequestException, ValueError) as err:
                last = repr(err)
            time.sleep(0.5)
        raise TorchServeError(f"{name} not READY in {timeout:.0f} s; last description: {last}\n" + self.log_tail())

    # --- inference -------------------------------------------------------------------------------

    def predict(self, name: str, body: Union[bytes, str, dict], timeout: float = 120, stream: bool = False,
                headers: Optional[Dict[str, str]] = None) -> requests.Response:
        """POST /predictions/<name> (a route may follow: "<name>/1.0/v1/completions"); a dict is sent as JSON. The
        response is returned whatever its status."""
        kwargs: dict = {"json": body} if isinstance(body, dict) else {
            "data": body.encode("utf-8") if isinstance(body, str) else body}
        return requests.post(f"{self.inference_url}/predictions/{name}", headers={**self._headers(), **(headers or {})},
                             timeout=timeout, stream=stream, **kwargs)

    def stream_chunks(self, name: str, body: Union[bytes, str, dict], timeout: float = 120) -> List[bytes]:
        """The chunks of a streamed (chunked) prediction, as they arrive; raise on a non-200 answer."""
        with self.predict(name, body, timeout=timeout, stream=True) as response:
            if response.status_code != 200:
                raise TorchServeError(f"predict {name}: {response.status_code} {response.text.strip()}\n"
                                      + self.log_tail())
            return [chunk for chunk in response.iter_content(chunk_size=None) if chunk]

    # --- diagnostics -----------------------------------------------------------------------------

    def log_tail(self, n: int = 80) -> str:
        """The last `n` lines of model_log.log and ts_log.log (and torchserve's own output)."""
        # torchserve.out repeats ts_log.log, but also holds what went wrong before logging started
        sources = ((self.log_dir / "model_log.log", n), (self.log_dir / "ts_log.log", n), (self.output_path, 15))
        return "\n".join(f"--- {path.name} ---\n{_tail(path, lines)}" for path, lines in sources)


def java_available() -> bool:
    return shutil.which("java") is not None or bool(os.environ.get("JAVA_HOME"))


def torchrun_agent(cmdline: List[str]) -> bool:
    """Whether a process's command line is torchrun's agent (whose arguments name the worker script too)."""
    return any(arg.endswith("torchrun") or arg == "torch.distributed.run" for arg in cmdline)
