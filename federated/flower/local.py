"""`python -m federated.flower local [main_fl_mr.py flags]`: a whole Flower deployment on this machine.

Starts a SuperLink and one SuperNode per site (training sites and the target site) as real processes
on free localhost ports, each with its own FLWR_HOME; TLS and SuperNode authentication are on, with
certificates and keys made for the run (`--insecure`: neither). Then `flwr run` starts the study,
whose output is streamed here, and every process started here is stopped, by its process group id,
when the study ends, fails or is interrupted. Each node keeps its clients' state under
`<save_dir>/nodes/<site>`, so `--resume <save_dir>` continues a study.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.sites import parse_site_list
from federated.cli import resolve_options
from federated.experiment import resolve_registry
from federated.flower.credentials import make_node_key, make_tls
from federated.flower.options import check_flower_support, check_waits, parse_flower_options
from federated.strategies import STRATEGIES
from utils.console import Console
from utils.errors import UserError
from utils.runlog import RunDir

PROG = "python -m federated.flower local"
APP_DIR = Path(__file__).resolve().parents[2]  # the source checkout holding pyproject.toml
CONNECTION = "local-deploy"
START_TIMEOUT = 120.0  # seconds for the SuperLink to listen
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of a process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_tool(name: str) -> str:
    """A flwr console script of this interpreter's environment."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise UserError(f"{name} not found next to {sys.executable}: install flwr (pip install -r requirements.txt)")
    return str(path)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path


class LocalDeployment:
    """A SuperLink and SuperNodes on localhost, in a private folder; `close` stops them all."""

    def __init__(self, secure: bool = True, workdir: Path | None = None):
        self.secure = secure
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fedrecon-flower-"))
        self.port = free_port()
        self.processes: dict[str, Process] = {}
        self.nodes: dict[str, dict] = {}  # site -> its start arguments, for restarts
        self.tls = make_tls(self.dir / "tls", ["localhost", "127.0.0.1"]) if secure else None
        self.cli_home = self.dir / "cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.port}"
        connection = f'root-certificates = "{self.tls["ca"]}"' if secure else "insecure = true"
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{connection}\n')

    # ---- processes ---------------------------------------------------------------------------
    def env(self, home: Path) -> dict:
        home.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in [str(APP_DIR), os.environ.get("PYTHONPATH", "")] if p)
        return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, args: list[str], home: Path) -> Process:
        log = self.dir / f"{name}.log"
        f = open(log, "ab")
        # Its own session: one process group to stop, and no Ctrl-C from the terminal.
        popen = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env(home),
                                 start_new_session=True)
        f.close()
        self.processes[name] = Process(name, popen, log)
        return self.processes[name]

    def start_superlink(self) -> None:
        args = [flwr_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.secure:
            args += ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                     "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth"]
        else:
            args += ["--insecure"]
        link = self._start("superlink", args, self.dir / "superlink")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if link.popen.poll() is not None:
                raise RuntimeError(f"the SuperLink exited ({link.popen.returncode}); see {link.log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not listen on port {self.port} in {START_TIMEOUT:g} s")
            time.sleep(0.2)

    def flwr(self, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this deployment (run outside any app folder)."""
        return subprocess.run([flwr_tool("flwr"), *args], cwd=self.cli_home, env=self.env(self.cli_home),
                              capture_output=capture, text=True)

    def add_node(self, site: str, node_config: dict[str, str]) -> None:
        """Register (with authentication) and start the SuperNode of `site`."""
        args = [flwr_tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config",
                " ".join(f"{k}={json.dumps(v)}" for k, v in {"site": site, **node_config}.items())]
        if self.secure:
            key, public = make_node_key(self.dir / "keys" / f"node-{site}")
            done = self.flwr("supernode", "register", str(public), CONNECTION)
            if done.returncode != 0:
                raise RuntimeError(f"flwr supernode register for site {site} failed: {done.stdout}{done.stderr}")
            args += ["--root-certificates", str(self.tls["ca"]), "--auth-supernode-private-key", str(key)]
        else:
            args += ["--insecure"]
        self.nodes[site] = {"args": args}
        self.start_node(site)

    def start_node(self, site: str) -> Process:
        return self._start(f"node-{site}", self.nodes[site]["args"], self.dir / f"node-{site}")

    def stop(self, name: str) -> None:
        """SIGTERM to the process `name`, its process group and every process it spawned (some
        flwr processes start their own group), SIGKILL to those left after STOP_GRACE seconds;
        returns when all are gone."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        pids = {proc.popen.pid, *descendants(proc.popen.pid)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _signal_all(proc.popen.pid, pids, sig)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline:
                proc.popen.poll()
                pids = {p for p in pids if _alive(p)}
                if not pids and not _group_alive(proc.popen.pid):
                    return
                time.sleep(0.1)
        proc.popen.wait()

    def close(self) -> None:
        for name in [n for n in self.processes if n != "superlink"] + ["superlink"]:
            self.stop(name)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the study ---------------------------------------------------------------------------
    def run(self, argv: list[str], echo: Callable[[str], None] = print) -> int:
        """`flwr run` of the project's app with `argv` as its flags; streams its output to `echo`
        and returns the study's exit code (0 done, 1 stopped or failed, 2 a user error)."""
        proc = subprocess.Popen([flwr_tool("flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
                                 "--run-config", f"argv={json.dumps(subprocess.list2cmdline(argv))}"],
                                cwd=self.cli_home, env=self.env(self.cli_home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.processes["flwr-run"] = Process("flwr-run", proc, self.dir / "flwr-run.log")
        run_id, user_error, stopped = None, False, False
        for line in proc.stdout:
            line = line.rstrip("\n")
            echo(line)
            if m := re.search(r"Successfully started run (\d+)", line):
                run_id = m.group(1)
            user_error |= "federated.flower: error:" in line
            stopped |= "federated.flower: stopped:" in line
        proc.wait()
        self.processes.pop("flwr-run", None)
        if run_id is None:
            return 1
        if user_error:
            return 2
        status = self.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
        completed = "finished:completed" in status.stdout
        return 0 if completed and not stopped else 1


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pgid: int, pids: set[int], sig: int) -> None:
    for kill, target in [(os.killpg, pgid)] + [(os.kill, p) for p in pids]:
        try:
            kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_alive(int(p.parent.name)) for p in Path("/proc").glob("[0-9]*/stat")
               if _pgid(p) == pgid)


def _pgid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    opts, flower = parse_flower_options(argv, PROG)
    log = Console(quiet=opts.quiet, verbose=opts.verbose)
    try:
        check_waits(flower)
        if not (APP_DIR / "pyproject.toml").is_file():
            raise UserError(f"{APP_DIR}: no pyproject.toml; run {PROG} from a fedrecon source checkout "
                            "(`flwr run` builds the Flower app from it)")
        opts = resolve_options(opts, argv, log)
        check_flower_support(opts, STRATEGIES[opts.strategy](opts))
        RunDir(Path(opts.save_dir), vars(opts), resume=bool(opts.continues), overwrite=opts.overwrite)
        registry, synthetic_root = resolve_registry(opts)
        sites = parse_site_list(opts.train_dataset, registry, "--train_dataset")
        sites += [s for s in parse_site_list(opts.test_dataset, registry, "--test_dataset") if s not in sites]
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    data = ({"data-root": str(synthetic_root)} if synthetic_root is not None else
            {k: str(Path(v).resolve()) for k, v in (("data-root", opts.data_root), ("sites", opts.sites)) if v})
    save_dir = Path(opts.save_dir).resolve()
    # The server resolves the same flags again; it must land on the same run folder.
    server_argv = list(argv) + (["--save_dir", str(save_dir)] if not opts.resume else [])
    # Ctrl-C and SIGTERM both end in `finally`, which stops every process started here.
    signal.signal(signal.SIGTERM, _interrupt)
    deployment = LocalDeployment(secure=not flower.insecure)
    try:
        log.info(f"Flower deployment in {deployment.dir}: SuperLink on 127.0.0.1:{deployment.port} "
                 f"({'TLS, SuperNode authentication' if deployment.secure else 'insecure'}), "
                 f"SuperNodes for {', '.join(sites)}")
        deployment.start_superlink()
        for site in sites:
            deployment.add_node(site, {**data, "state-dir": str(save_dir / "nodes" / site)})
        return deployment.run(server_argv)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last complete round is in {save_dir}/last.pt. "
              f"Continue with: {PROG} --resume {save_dir}", file=sys.stderr)
        return 130
    finally:
        deployment.close()
