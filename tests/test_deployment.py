"""Deployment on loopback: the rehearsal with TLS and node authentication, intruders refused without disturbing it,
the hospitals' audit logs against what the SuperLink received, and one-line errors at start-up."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest

from client import supernode
from common.config import parse_run_config, project_settings
from common.errors import ConfigError
from common.demo_sites import write_demo_sites
from common.deployment import SuperLinkSetup, SuperNodeSetup, superlink_command, supernode_command
from common.model import build_model
from common.tls import DeploymentError
from server import rehearse
from server.launch import free_port

PROJECT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("certificates", PROJECT / "deploy" / "certificates.py")
certificates = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(certificates)


def private_images(site_files) -> None:
    """Make each site's images readable by their owner only, as a hospital keeps them (the ClientApp user must not read them)."""
    from common.site_file import load_site_config

    for path in site_files:
        os.chmod(load_site_config(path).data_root, 0o700)


def test_the_rehearsal_trains_over_tls_refuses_intruders_and_the_audit_logs_match_what_arrived(tmp_path, capsys, own_flower_processes):
    demo = parse_run_config({**project_settings(), "num-hospitals": 2, "images-per-hospital": 60, "heldout-images": 30, "image-size": 32})
    *site_files, heldout = write_demo_sites(demo, tmp_path / "sites")
    private_images(site_files)
    certs = rehearse.make_certificates(tmp_path, ["hospital-0", "hospital-1", "intruder"])
    cfg = rehearse.rehearsal_config(tmp_path, heldout, hospitals=2, rounds=2, overrides={"run-name": "rehearsal"})
    with rehearse.federation(tmp_path) as fed:
        for name, site_file in zip(("hospital-0", "hospital-1"), site_files):
            rehearse.register(fed, certs / "hospitals" / f"{name}.pub", name)
            rehearse.start_supernode(fed, site_file, certs / "hospitals" / name, name)
        unregistered = rehearse.start_supernode(fed, site_files[1], certs / "hospitals" / "intruder", "intruder")
        plaintext = rehearse.start_supernode(fed, site_files[1], None, "plaintext", insecure=True, worker=False)
        # Our start command refuses to try plaintext against a TLS SuperLink, in one line.
        code = supernode.main(["--site", str(site_files[1]), "--superlink", fed.address, "--insecure"])
        assert code == 2 and f"SuperLink {fed.address} runs with TLS: connect without --insecure" in capsys.readouterr().err
        folder = rehearse.run(fed, cfg)
        assert unregistered.wait(60) != 0 and plaintext.wait(60) != 0  # both refused at once, neither got in
    log = (tmp_path / "logs" / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in log
    for name in ("hospital-0", "hospital-1"):  # one long-lived worker per hospital loaded its site once for all 5 messages
        node_log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert node_log.count("[worker] ready on") == 1 and node_log.count(f"[{name}] ") == 1, node_log[-2000:]
        assert "unisolated" not in node_log  # the server's code ran as the ClientApp user
    assert "400 Bad Request" in (tmp_path / "logs" / "plaintext.log").read_text()  # the proxy's answer to plain HTTP on its TLS port
    assert not own_flower_processes()

    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2] and history["n_sites"].iloc[1:].tolist() == [2, 2]
    assert history["n_failed"].tolist() == [0, 0, 0] and history["heldout_auc"].between(0, 1).all()
    received = pd.read_csv(folder / "received.csv")
    audit = [json.loads(line) for name in ("hospital-0", "hospital-1") for line in (tmp_path / "sites" / "reports" / name / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["sha256"] for e in audit) == sorted(received["sha256"]) and len(audit) == 10  # 2 sites x (overlap + 2 rounds x (train, evaluate))
    expected = {(s, r, t) for s in ("hospital-0", "hospital-1") for r in (1, 2) for t in ("train", "evaluate")} | {(s, 0, "query") for s in ("hospital-0", "hospital-1")}
    assert {(e["site"], e["round"], e["type"]) for e in audit} == expected
    model_bytes = sum(w.nbytes for w in build_model("lightcnn", (32, 32, 1), 1, 1e-3).get_weights())
    for entry in audit:  # no image data: weights (and their headers) in train replies, a few hundred numbers in evaluate replies
        array_bytes = sum(a["bytes"] for a in entry["arrays"])
        assert (model_bytes <= array_bytes <= model_bytes + 256 * len(entry["arrays"])) if entry["type"] == "train" else array_bytes == 0
        assert set(entry["values"]) <= {"metrics.num-examples", "metrics.train-loss", "metrics.skipped-files", "metrics.not-images",
                                        "metrics.hist-intervals", "metrics.hist-starts", "metrics.hist-pos", "metrics.hist-neg",
                                        "metrics.overlap-count", "site.site-name", "site.labels"}  # fmt: skip


@pytest.fixture
def certs(tmp_path) -> Path:
    """A CA, a SuperLink certificate for loopback and one hospital key pair."""
    out = tmp_path / "certs"
    certificates.make_ca(out)
    certificates.make_superlink_cert(out, ["127.0.0.1", "localhost"])
    certificates.make_hospital_keys(out, "st-marys")
    return out


@pytest.fixture
def site_file(tmp_path) -> Path:
    """A minimal valid site file."""
    (tmp_path / "data" / "lesion").mkdir(parents=True)
    path = tmp_path / "site.yaml"
    path.write_text("name: st-marys\ndata-root: data\nlayout: folders\nlabels: {lesion: lesion}\n")
    return path


def test_the_certificates_carry_the_hosts_and_pass_the_start_up_checks(certs):
    command = superlink_command(SuperLinkSetup(certs=certs))
    assert "--enable-supernode-auth" in command and "--ssl-certfile" in command and "--insecure" not in command
    assert "names 127.0.0.1, localhost" in certificates.describe(certs / "superlink.crt")
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0 and (certs / "hospitals" / "st-marys").stat().st_mode & 0o077 == 0
    assert (certs / "hospitals" / "st-marys.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_bad_certificates_give_one_line_saying_what_to_fix(certs, tmp_path):
    with pytest.raises(DeploymentError, match="CA certificate .*missing/ca.crt: cannot be read \\(No such file or directory\\)"):
        superlink_command(SuperLinkSetup(certs=tmp_path / "missing"))
    expired = tmp_path / "expired"
    shutil.copytree(certs, expired)
    certificates.make_superlink_cert(expired, ["127.0.0.1"], days=1, valid_from=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3), force=True)
    with pytest.raises(DeploymentError, match="SuperLink certificate .*expired on .*renew it"):
        superlink_command(SuperLinkSetup(certs=expired))
    mismatched = tmp_path / "mismatched"
    shutil.copytree(certs, mismatched)
    other = tmp_path / "other"
    shutil.copytree(certs, other)
    certificates.make_superlink_cert(other, ["127.0.0.1"], force=True)
    shutil.copy(other / "superlink.key", mismatched / "superlink.key")
    with pytest.raises(DeploymentError, match="superlink.key does not belong to the certificate"):
        superlink_command(SuperLinkSetup(certs=mismatched))
    stranger = tmp_path / "stranger"
    certificates.make_ca(stranger)
    shutil.copy(stranger / "ca.crt", mismatched / "ca.crt")
    with pytest.raises(DeploymentError, match="not signed by the CA"):
        superlink_command(SuperLinkSetup(certs=mismatched))
    with pytest.raises(DeploymentError, match="no certificate folder: give --certs"):
        superlink_command(SuperLinkSetup())


def test_a_hospital_start_with_a_bad_setting_says_what_to_fix_in_one_line(certs, site_file, tmp_path, capsys):
    silent = free_port()  # nothing listens there
    key = certs / "hospitals" / "st-marys"
    with pytest.raises(DeploymentError, match=f"SuperLink 127.0.0.1:{silent} does not answer"):
        supernode_command(SuperNodeSetup(site_file, f"127.0.0.1:{silent}", certs / "ca.crt", key))
    with pytest.raises(DeploymentError, match="SuperNode key .*: not an unencrypted OpenSSH private key"):
        supernode_command(SuperNodeSetup(site_file, "127.0.0.1:1", certs / "ca.crt", certs / "ca.crt"))
    with pytest.raises(DeploymentError, match="give the federation's CA certificate"):
        supernode_command(SuperNodeSetup(site_file, "127.0.0.1:1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [st-marys\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        supernode_command(SuperNodeSetup(broken, "127.0.0.1:1", certs / "ca.crt", key))
    code = supernode.main(["--site", str(site_file), "--superlink", f"127.0.0.1:{silent}", "--ca", str(certs / "ca.crt"), "--key", str(key)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not answer" in err


def test_a_superlink_certificate_from_another_ca_is_refused_before_connecting(certs, site_file, tmp_path):
    """A hospital holding a different federation's CA does not trust our SuperLink: a TLS server on loopback shows it."""
    import ssl
    import threading

    stranger = tmp_path / "stranger"
    certificates.make_ca(stranger)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")

    def serve() -> None:
        conn, _ = server.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(DeploymentError, match="certificate does not verify against .*stranger/ca.crt"):
        supernode_command(SuperNodeSetup(site_file, f"127.0.0.1:{port}", stranger / "ca.crt", certs / "hospitals" / "st-marys"))
    server.close()


def test_the_superlink_command_listens_only_where_told_and_registers_into_the_roster(certs, tmp_path, site_file):
    """`python -m server.superlink` as an operator runs it, from a shell whose PATH lacks this installation: nginx on the
    --listen address, the SuperLink and its SuperExec on loopback only; `register` writes the roster."""
    import subprocess
    import sys
    import time

    import psutil

    listen, internal = free_port(), free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    command = [sys.executable, "-m", "server.superlink", "--certs", str(certs), "--listen", f"127.0.0.1:{listen}",
               "--state", str(tmp_path / "state"), "--internal-port", str(internal)]  # fmt: skip
    process = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        while not any("hospitals connect to" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            lines.append(line)
        # a hospital's start checks pass against it: it answers over TLS with a certificate our CA signed
        supernode_command(SuperNodeSetup(site_file, f"127.0.0.1:{listen}", certs / "ca.crt", certs / "hospitals" / "st-marys"))
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        listening = {(c.laddr.ip, c.laddr.port) for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", listen), ("127.0.0.1", internal)}, listening  # nothing on every interface
        registered = subprocess.run([sys.executable, "-m", "server.superlink", "register", "--certs", str(certs), "--state", str(tmp_path / "state"),
                                     "--name", "st-marys", "--key", str(certs / "hospitals" / "st-marys.pub"), "--images", "120"],
                                    cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert registered.returncode == 0, registered.stderr
        from server.roster import load_roster

        (entry,) = load_roster(certs / "roster.yaml").values()
        assert entry.name == "st-marys" and entry.images == 120 and f"node {entry.node_id}" in registered.stdout
        time.sleep(1)
        assert process.poll() is None  # still serving
        assert oct((tmp_path / "state" / "linkstate.db").stat().st_mode & 0o777) == "0o600"
    finally:
        process.terminate()
        assert process.wait(60) == 0
    assert not psutil.wait_procs(tree, timeout=20)[1]  # nginx, the SuperLink and its SuperExec stopped with it


def test_the_rehearsal_runs_the_hospitals_site_files_it_is_given(tmp_path, capsys, own_flower_processes):
    """`sites=` and `heldout-site=` as a user passes them: each site file becomes a hospital (its own name, its own
    report folder), the held-out set is that site; nothing is ignored."""
    demo = parse_run_config({**project_settings(), "num-hospitals": 2, "images-per-hospital": 40, "heldout-images": 20, "image-size": 32})
    *site_files, heldout = write_demo_sites(demo, tmp_path / "mine")
    private_images(site_files)
    for path, name in zip(site_files, ("st-anne", "riverside")):
        path.write_text(path.read_text().replace(f"name: {path.stem}", f"name: {name}"))
    code = rehearse.main([
        "--rounds", "1", "--workdir", str(tmp_path / "work"),
        "-c", f"sites='{site_files[0]},{site_files[1]}' heldout-site='{heldout}' run-name='mine'",
    ])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert not own_flower_processes()
    assert "data check: site 'st-anne' ready" in out.out and "data check: site 'riverside' ready" in out.out
    folder = tmp_path / "work" / "runs" / "mine"
    assert sorted(pd.read_csv(folder / "sites.csv")["site"]) == ["riverside", "st-anne"]
    assert pd.read_csv(folder / "history.csv")["heldout_n"].iloc[0] == 20  # the held-out site given, not the demo's 60
    for name in ("st-anne", "riverside"):  # the hospitals read their own site files: their reports are beside them
        assert (tmp_path / "mine" / "reports" / name / "audit.jsonl").is_file()


def test_a_rehearsal_whose_hospitals_cannot_train_fails_naming_each(tmp_path, capsys, own_flower_processes):
    demo = parse_run_config({**project_settings(), "num-hospitals": 2, "images-per-hospital": 30, "heldout-images": 20, "image-size": 32})
    *site_files, heldout = write_demo_sites(demo, tmp_path / "broken")
    private_images(site_files)
    for name in ("hospital-0", "hospital-1"):
        (tmp_path / "broken" / name / "lesion" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    overrides = f"sites='{site_files[0]},{site_files[1]}' heldout-site='{heldout}'"
    assert rehearse.main(["--rounds", "1", "--workdir", str(tmp_path / "checked"), "-c", overrides]) == 2  # the data check
    err = capsys.readouterr().err
    assert "site 'hospital-0'" in err and "site 'hospital-1'" in err and "NOT READY" in err
    # Past the check (the files broke afterwards), the run fails at round 1 and names each hospital once.
    certs = rehearse.make_certificates(tmp_path, ["hospital-0", "hospital-1"])
    cfg = rehearse.rehearsal_config(tmp_path, heldout, hospitals=2, rounds=2, overrides={"run-name": "broken"})
    with rehearse.federation(tmp_path) as fed:
        for name, site_file in zip(("hospital-0", "hospital-1"), site_files):
            rehearse.register(fed, certs / "hospitals" / f"{name}.pub", name)
            rehearse.start_supernode(fed, site_file, certs / "hospitals" / name, name)
        with pytest.raises(rehearse.RunFailed) as failed:
            rehearse.run(fed, cfg)
    assert not own_flower_processes()
    reason = str(failed.value)
    assert reason.startswith("round 1: 0 valid training update(s), fewer than min-hospitals = 2")
    for name in ("hospital-0", "hospital-1"):
        assert f"{name} (train): client error: DataError: site '{name}': 1 file(s) cannot be read: <data-root>/lesion/corrupt.png" in reason
    history = pd.read_csv(tmp_path / "runs" / "broken" / "history.csv")
    assert history["round"].tolist() == [0, 1] and history.loc[1, "n_failed"] == 2
    assert json.loads((tmp_path / "runs" / "broken" / "status.json").read_text())["status"] == "failed"
