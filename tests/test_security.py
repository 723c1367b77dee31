"""The deployment attacked as an outsider would, on loopback: only the Fleet API faces the hospitals, code from the
server never touches the images, a site is who its key says, registrations outlive a SuperLink restart, keys are
private from their first byte."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from common.config import parse_run_config, project_settings
from common.demo_sites import write_demo_sites
from common.site_file import load_site_config
from server import rehearse
from server.roster import load_roster
from server.stack import CONNECTION, restart_superlink

PROJECT = Path(__file__).resolve().parent.parent
ROGUE_APP = Path(__file__).resolve().parent / "rogue_app"
_spec = importlib.util.spec_from_file_location("certificates", PROJECT / "deploy" / "certificates.py")
certificates = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(certificates)


def _sites(tmp_path: Path, hospitals: int, images: int = 40) -> tuple[list[Path], Path]:
    """Demo hospitals' site files (their images readable by their owner only, as a hospital keeps them) and the held-out one."""
    demo = parse_run_config({**project_settings(), "num-hospitals": hospitals, "images-per-hospital": images, "heldout-images": 20, "image-size": 32})
    *site_files, heldout = write_demo_sites(demo, tmp_path / "sites")
    for path in site_files:
        os.chmod(load_site_config(path).data_root, 0o700)
    return site_files, heldout


def _outsider(address: str, path: str, ca: Path | None, method: str = "POST") -> int:
    """The HTTP status an outsider gets, with curl (the path sent as written): trusting ca.crt, or trusting nothing (-k);
    0 where nothing answers."""
    trust = ["--cacert", str(ca)] if ca is not None else ["-k"]
    out = subprocess.run(
        ["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, *trust, "-H", "Content-Type: application/protobuf",
         "--data-binary", "", "--max-time", "20", f"https://{address}{path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    return int(out.stdout or 0)


CONTROL = ["/v1/control/list-runs", "/v1/control/stop-run", "/v1/control/stream-logs", "/v1/control/register-node", "/v1/control/start-run"]
OTHERS = ["/v1/runtime/acquire-task", "/health", "/docs", "/openapi.json", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
          "/v1/control/list-runs/../../fleet/get-run", "//v1/control/list-runs", "/v1/fleet/get-run?x=/v1/control"]  # fmt: skip


def test_outsiders_get_nothing_a_rogue_app_reads_nothing_and_a_liar_is_named_while_the_federation_trains(tmp_path, own_flower_processes):
    """One federation of two hospitals and a third whose replies claim another hospital's name, training for three
    rounds while: outsiders holding only ca.crt, or nothing, try the Control and Runtime APIs through the hospitals'
    address (curl, and the flwr command line itself); and the operator's own CLI submits a rogue app whose ClientApp
    tries to read a hospital's images."""
    if os.geteuid() != 0:
        pytest.fail("the ClientApps can be run as another user only by root (CI runs the suite as root)")
    site_files, heldout = _sites(tmp_path, 3)
    liar_site = site_files[2].with_name("liar.yaml")  # the third hospital's images, its replies signed 'hospital-0'
    liar_site.write_text(site_files[2].read_text().replace("name: hospital-2", "name: hospital-0").replace("data-root: hospital-2", f"data-root: {load_site_config(site_files[2]).data_root}"))
    certs = rehearse.make_certificates(tmp_path, ["hospital-0", "hospital-1", "liar", "intruder"])
    image = next(load_site_config(site_files[0]).data_root.rglob("*.png"))
    cfg = rehearse.rehearsal_config(tmp_path, heldout, hospitals=3, rounds=3, overrides={"run-name": "legit", "min-hospitals": 2})
    with rehearse.federation(tmp_path) as fed:
        for name, site_file in (("hospital-0", site_files[0]), ("hospital-1", site_files[1]), ("liar", liar_site)):
            rehearse.register(fed, certs / "hospitals" / f"{name}.pub", name)
            rehearse.start_supernode(fed, site_file, certs / "hospitals" / name, name)
        done: list = []
        legit = threading.Thread(target=lambda: done.append(rehearse.run(fed, cfg)))
        legit.start()
        answers = {}
        for ca in (certs / "ca.crt", None):
            for path in CONTROL + OTHERS:
                answers[(path, "ca.crt" if ca else "no CA")] = _outsider(fed.address, path, ca)
            answers[("GET /v1/fleet/get-run", "ca.crt" if ca else "no CA")] = _outsider(fed.address, "/v1/fleet/get-run", ca, "GET")
        # the flwr command line, pointed at the hospitals' address with ca.crt: what an outsider with Flower would try
        outsider_home = tmp_path / "outsider"
        outsider_home.mkdir()
        (outsider_home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{fed.address}"\nroot-certificates = "{certs / "ca.crt"}"\n')
        flwr = lambda *a: subprocess.run([str(rehearse.BIN / "flwr"), *a], env={**fed.env, "FLWR_HOME": str(outsider_home)}, capture_output=True, text=True, timeout=120)  # noqa: E731
        cli = {"ls": flwr("ls", "x"), "register": flwr("supernode", "register", str(certs / "hospitals" / "intruder.pub"), "x"),
               "run": flwr("run", str(ROGUE_APP), "x"), "stop": flwr("stop", "1", "x"), "log": flwr("log", "1", "x")}  # fmt: skip
        # the operator's own CLI submits the rogue app: its ClientApp runs at the hospitals, as the ClientApp user
        rogue_out = tmp_path / "rogue.json"
        submitted = fed.stack.flwr("run", str(ROGUE_APP), CONNECTION, "--run-config", f"target='{image}' out='{rogue_out}'")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        deadline = time.time() + 300
        while not rogue_out.exists() and time.time() < deadline:
            time.sleep(1)
        legit.join(900)
        registered = json.loads(fed.stack.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
    assert not own_flower_processes()
    print("\n".join(f"outsider {kind}: {path} -> {code}" for (path, kind), code in answers.items()))
    assert all(code in (403, 404, 405) for code in answers.values()), answers  # refused at the proxy, never passed on
    for name, out in cli.items():
        print(f"outsider flwr {name}: exit {out.returncode}: {(out.stdout + out.stderr).strip().splitlines()[-1:]}")
        assert out.returncode != 0, name
    assert len(registered) == 3  # the intruder's key was not registered
    outcomes = json.loads(rogue_out.read_text())
    print("rogue app:", outcomes)
    assert len(outcomes) == 3, outcomes  # every hospital ran it ...
    for outcome in outcomes:  # ... as the ClientApp user, who could open neither the image nor its folder
        assert outcome["user"] == str(pwd.getpwnam("fedimaging-app").pw_uid), outcome
        assert outcome["image"].startswith("PermissionError") and outcome["folder"].startswith("PermissionError"), outcome
    (folder,) = done
    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2, 3] and history["n_sites"].iloc[1:].tolist() == [2, 2, 2]
    assert all("liar (train): invalid reply: claims to be 'hospital-0', but this node's key is registered for 'liar'" in f for f in history["failures"].iloc[1:])
    sites = pd.read_csv(folder / "sites.csv")
    assert sorted(set(sites["site"])) == ["hospital-0", "hospital-1"] and (sites.groupby("round").size() == 2).all()  # one hospital-0, not two


def test_a_superlink_restart_keeps_the_registrations_the_hospitals_come_back_and_a_lost_one_exits_non_zero(tmp_path, own_flower_processes):
    """Hospital 1 runs as compose-hospital.yml lays it out: its ClientApps apart (as their own container would), reaching
    its worker and SuperNode through an exchange folder only."""
    site_files, heldout = _sites(tmp_path, 2)
    certs = rehearse.make_certificates(tmp_path, ["hospital-0", "hospital-1"])
    exchange = Path(tempfile.mkdtemp(prefix="fedimaging-exchange-", dir="/tmp")) / "exchange"
    exchange.parent.chmod(0o711)  # the ClientApp user may pass through to it, as to a volume mounted in its container
    with rehearse.federation(tmp_path) as fed:
        for name, site_file, apart in zip(("hospital-0", "hospital-1"), site_files, (None, exchange)):
            rehearse.register(fed, certs / "hospitals" / f"{name}.pub", name)
            rehearse.start_supernode(fed, site_file, certs / "hospitals" / name, name, exchange=apart)
        first = rehearse.run(fed, rehearse.rehearsal_config(tmp_path, heldout, 2, 1, {"run-name": "before", "round-timeout": 240}))
        restart_superlink(fed.stack)  # killed as a crash would; the same database
        deadline = time.time() + 180
        while time.time() < deadline:
            nodes = json.loads(fed.stack.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout or "{}").get("nodes", [])
            if len(nodes) == 2 and all(n["status"] == "online" for n in nodes):
                break
            time.sleep(2)
        assert len(nodes) == 2 and all(n["status"] == "online" for n in nodes), nodes  # back without anyone registering them again
        second = rehearse.run(fed, rehearse.rehearsal_config(tmp_path, heldout, 2, 1, {"run-name": "after", "round-timeout": 240}))
        runs = json.loads(fed.stack.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
        node_1 = next(e.node_id for e in load_roster(fed.roster).values() if e.name == "hospital-1")
        fed.stack.flwr("supernode", "unregister", str(node_1), CONNECTION)
        assert fed.nodes[1].wait(180) != 0  # a hospital whose registration is gone stops, and says so with its exit code
        assert fed.nodes[0].poll() is None
    assert not own_flower_processes()
    assert sorted(p.name for p in exchange.iterdir()) == []  # the hospital took back what it shared
    shutil.rmtree(exchange.parent)
    for folder in (first, second):
        history = pd.read_csv(folder / "history.csv")
        assert history["n_sites"].iloc[-1] == 2 and history["n_failed"].tolist() == [0, 0]
    assert len(runs) == 2  # the run before the restart is still known
    assert "the SuperNode stopped" in (tmp_path / "logs" / "hospital-1.log").read_text()


def test_keys_are_private_from_their_first_byte_and_never_replaced_without_force(tmp_path, monkeypatch):
    seen = {}
    real_open = os.open

    def watching(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        seen[str(path)] = os.fstat(fd).st_mode & 0o777  # the mode the file has the moment it exists, before any byte
        return fd

    monkeypatch.setattr(certificates.os, "open", watching)
    old_umask = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        certificates.make_ca(tmp_path)
        certificates.make_superlink_cert(tmp_path, ["127.0.0.1"])
        certificates.make_hospital_keys(tmp_path, "st-marys")
    finally:
        os.umask(old_umask)
    private = {p: m for p, m in seen.items() if p.endswith(("ca.key.partial", "superlink.key.partial", "st-marys.partial"))}
    assert len(private) == 3 and set(private.values()) == {0o600}, seen
    for name in ("ca.key", "superlink.key", "hospitals/st-marys"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    before = (tmp_path / "hospitals" / "st-marys").read_bytes()
    with pytest.raises(certificates.Exists, match="exists already: keep it, or pass --force"):
        certificates.make_hospital_keys(tmp_path, "st-marys")
    assert (tmp_path / "hospitals" / "st-marys").read_bytes() == before
    assert certificates.main(["hospital", "--out", str(tmp_path), "--name", "st-marys"]) == 2
    assert certificates.main(["hospital", "--out", str(tmp_path), "--name", "st-marys", "--force"]) == 0
    assert (tmp_path / "hospitals" / "st-marys").read_bytes() != before


def test_the_runtime_api_answers_no_one_without_the_superexec_secret(tmp_path, own_flower_processes):
    """The secret is in force, not just passed: on the SuperLink's own loopback port, a request for a task without the
    SuperExec's signature is refused (401); the proxy does not even pass it on (404)."""
    certs = rehearse.make_certificates(tmp_path, [])
    with rehearse.federation(tmp_path) as fed:
        inside = _outsider(f"127.0.0.1:{fed.stack.internal_port}", "/v1/runtime/acquire-task", certs / "ca.crt")
        outside = _outsider(fed.address, "/v1/runtime/acquire-task", certs / "ca.crt")
        superexec_log = (fed.stack.state / "superlink.out").read_text()
    assert not own_flower_processes()
    assert (inside, outside) == (401, 404)
    assert "SuperExec auth secret is ignored" not in superexec_log
    shutil.rmtree(tmp_path / "server", ignore_errors=True)


RAY_METHODS = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/FreeObjects", "/ray.rpc.CoreWorkerService/NumPendingTasks")  # fmt: skip


def _stranger_asks(host: str, port: int) -> str:
    """What a listener answers a stranger without the run's Ray token: the gRPC status of the first Ray method it
    serves (an empty request), or, for an HTTP listener, the HTTP status."""
    import grpc

    for method in RAY_METHODS:
        try:
            grpc.insecure_channel(f"{host}:{port}").unary_unary(method)(b"", timeout=10)
            return f"{method}: ANSWERED"
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # not gRPC: Ray's runtime-environment agent speaks HTTP
                return f"HTTP {_outsider_http(host, port)}"
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return exc.code().name
    return "no Ray method"


def _outsider_http(host: str, port: int) -> int:
    """The HTTP status of a plain POST, as an outsider's curl gets it."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--max-time", "10", f"http://{host}:{port}/"], capture_output=True, text=True)
    return int(out.stdout or 0)


def _still_listening(process, port: int) -> bool:
    """Whether the process still listens on the port (an idle Ray worker may exit between being listed and being asked)."""
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections(kind="tcp"))
    except psutil.Error:
        return False


def test_the_simulations_ray_processes_answer_no_one_without_the_runs_token(tmp_path, own_flower_processes):
    """Ray's processes listen on every interface (Ray 2.55 cannot be told otherwise); each listener of the simulation's
    process tree that is not on loopback must refuse a stranger: gRPC UNAUTHENTICATED, HTTP 401."""
    import psutil

    simulation = subprocess.Popen(
        [sys.executable, "-m", "server.simulate", "-c", f"num-hospitals=2 images-per-hospital=40 heldout-images=20 image-size=16 num-server-rounds=3 output-dir='{tmp_path}'"],
        stdout=open(tmp_path / "simulation.log", "w"), stderr=subprocess.STDOUT, cwd=PROJECT,
    )  # fmt: skip
    answers: dict[tuple[str, str, int], str] = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any("ClientApp" in n for n, _, _ in answers):  # until the hospitals' actors listen too
            time.sleep(2)
            for process in psutil.Process(simulation.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    for conn in process.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN and (process.name(), conn.laddr.ip, conn.laddr.port) not in answers:
                            host = "127.0.0.1" if conn.laddr.ip in ("0.0.0.0", "::") else conn.laddr.ip
                            loopback = conn.laddr.ip.startswith("127.") or conn.laddr.ip in ("::1", "::ffff:127.0.0.1")
                            answer = "loopback only" if loopback else _stranger_asks(host, conn.laddr.port)
                            if answer in ("HTTP 0", "CANCELLED"):  # no answer at all: a listener closing as it was asked?
                                time.sleep(3)
                                closing = not _still_listening(process, conn.laddr.port)  # an idle Ray worker exiting cancels its calls
                                answer = "closed when asked" if closing else _stranger_asks(host, conn.laddr.port)
                            answers[(process.name(), conn.laddr.ip, conn.laddr.port)] = answer
    finally:
        assert simulation.wait(600) == 0, (tmp_path / "simulation.log").read_text()[-3000:]
    assert not own_flower_processes()
    print("\n".join(f"{name} on {ip}:{port}: {answer}" for (name, ip, port), answer in sorted(answers.items())))
    assert any(name == "gcs_server" for name, _, _ in answers) and any("ClientApp" in name for name, _, _ in answers), answers
    assert all(answer in ("loopback only", "UNAUTHENTICATED", "HTTP 401", "closed when asked") for answer in answers.values()), answers
    assert {a for (name, _, _), a in answers.items() if name == "gcs_server"} == {"UNAUTHENTICATED"}, answers
    assert {a for (name, _, _), a in answers.items() if name.startswith("flower-")} == {"loopback only"}  # Flower's own SuperLink
