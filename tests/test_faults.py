"""A lost hospital on the loopback deployment (TLS, node authentication, roster): a SuperNode killed mid-run is named
once per phase with its true reason, the rounds go on within their bounds, and it rejoins once restarted; with
min-hospitals equal to the hospitals and one of them gone, the run ends after a bounded wait saying why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

from common.config import parse_run_config, project_settings
from common.demo_sites import write_demo_sites
from server import rehearse
from server.attendance import attend, sample
from server.launch import BIN, PROJECT
from server.roster import load_roster
from server.stack import CONNECTION
from server import simulate
from tests.test_deployment import private_images

sys.path.insert(0, str(Path(__file__).resolve().parent / "attack_app"))
from attack_maker import make_attack_app  # noqa: E402 - tests/attack_app/attack_maker.py

NAMES = [f"hospital-{i}" for i in range(3)]


class _Connected:
    """The one thing attend() asks of Flower's Grid: which nodes are connected now (a node joining after `at` s)."""

    def __init__(self, nodes: list[int], late: int | None = None, at: float = 0.0) -> None:
        self.nodes, self.late, self.joins = nodes, late, time.monotonic() + at

    def get_node_ids(self) -> list[int]:
        return self.nodes + ([self.late] if self.late is not None and time.monotonic() >= self.joins else [])


def test_a_phase_waits_for_the_expected_hospitals_at_most_node_wait_and_samples_the_same_way_every_time():
    said = []
    found = attend(_Connected([1, 2]), {1, 2, 3}, 2, 0.5, said.append, poll=0.05)
    assert found.present == [1, 2] and found.absent == [3] and 0.5 <= found.waited < 1.5 and len(said) == 1
    found = attend(_Connected([1, 2], late=3, at=0.2), {1, 2, 3}, 2, 5.0, said.append, poll=0.05)
    assert found.present == [1, 2, 3] and found.absent == [] and found.waited < 2  # went on as soon as it came
    assert attend(_Connected([4, 5]), set(), 2, 5.0, said.append).waited < 0.5  # nobody expected yet, min-hospitals there
    names = {7: "st-marys", 3: "guys", 9: "kings", 4: "barts"}.get
    picked = sample([7, 3, 9, 4], 0.5, 1, 42, 3, "train", key=names)
    renumbered = {70: "st-marys", 30: "guys", 90: "kings", 40: "barts"}  # the same hospitals under other node ids (a new run)
    again = sample([90, 40, 70, 30], 0.5, 1, 42, 3, "train", key=renumbered.get)
    assert [names(n) for n in picked] == [renumbered[n] for n in again]  # the same hospitals drawn, by name
    assert len(sample([1, 2, 3, 4], 0.5, 3, 42, 3, "train")) == 3 and sorted(sample([1, 2], 1.0, 3, 42, 1, "train")) == [1, 2]


def _node_status(fed: rehearse.Federation, node_id: int) -> str:
    """The SuperLink's word on a node: online, offline, registered..."""
    out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"], env=fed.env, cwd=PROJECT, capture_output=True, text=True, timeout=60)
    return {n["node-id"]: n["status"] for n in json.loads(out.stdout)["nodes"]}.get(str(node_id), "?")


def _wait(condition, timeout: float, what: str) -> None:
    """Poll until condition() holds, or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(1)


def _last_round(folder: Path) -> int:
    """The last round the run folder's status says is written (-1 before any)."""
    try:
        return json.loads((folder / "status.json").read_text()).get("last_round", -1)
    except (OSError, ValueError):
        return -1


def test_a_killed_hospital_is_named_once_the_rounds_go_on_it_rejoins_and_too_few_end_the_run(tmp_path, own_flower_processes):
    demo = parse_run_config({**project_settings(), "num-hospitals": 3, "images-per-hospital": 60, "heldout-images": 30, "image-size": 32})
    *site_files, heldout = write_demo_sites(demo, tmp_path / "sites")
    private_images(site_files)
    certs = rehearse.make_certificates(tmp_path, NAMES)
    lost = {"run-name": "lost", "min-hospitals": 2, "round-quorum": 0.6, "quorum-grace": 5.0, "node-wait": 120.0, "round-timeout": 120.0, "gradcam-images": 0}
    cfg = rehearse.rehearsal_config(tmp_path, heldout, hospitals=3, rounds=6, overrides=lost)
    folder = Path(cfg.output_dir) / "lost"
    with rehearse.federation(tmp_path) as fed:
        nodes = {}
        for name, site_file in zip(NAMES, site_files):
            rehearse.register(fed, certs / "hospitals" / f"{name}.pub", name)
            nodes[name] = rehearse.start_supernode(fed, site_file, certs / "hospitals" / name, name)
        ids = {r.name: n for n, r in load_roster(fed.roster).items()}
        ended: dict = {}

        def run(run_cfg, key) -> None:
            try:
                ended[key] = rehearse.run(fed, run_cfg)
            except Exception as exc:  # noqa: BLE001 - the main thread asserts on it
                ended[key] = exc

        runner = threading.Thread(target=run, args=(cfg, "lost"))
        runner.start()
        _wait(lambda: _last_round(folder) >= 1 or not runner.is_alive(), 400, "round 1 written")
        os.killpg(nodes["hospital-2"].pid, signal.SIGKILL)  # the hospital's machine dies: worker, SuperNode, ClientApps
        killed_after = _last_round(folder)
        _wait(lambda: _node_status(fed, ids["hospital-2"]) == "offline" or not runner.is_alive(), 180, "the SuperLink marking hospital-2 offline")
        rehearse.start_supernode(fed, site_files[2], certs / "hospitals" / "hospital-2", "hospital-2-again")
        runner.join(900)
        assert isinstance(ended.get("lost"), Path), ended

        # The same federation, min-hospitals = all three, one of them stopped: a bounded wait, then a clear end.
        again = fed.nodes[-1]
        os.killpg(again.pid, signal.SIGTERM)
        again.wait(60)
        _wait(lambda: _node_status(fed, ids["hospital-2"]) == "offline", 180, "the SuperLink marking hospital-2 offline again")
        few = rehearse.rehearsal_config(tmp_path, heldout, hospitals=3, rounds=2, overrides={"run-name": "too-few", "node-wait": 5.0, "gradcam-images": 0})
        started = time.monotonic()
        run(few, "too-few")
        took = time.monotonic() - started
    assert not own_flower_processes()

    history = pd.read_csv(folder / "history.csv", keep_default_na=False)
    assert history["round"].tolist() == list(range(7))  # every round once, the run finished
    assert json.loads((folder / "status.json").read_text())["status"] == "finished"
    hit = history[history["failures"] != ""]
    assert len(hit) and hit["round"].min() in (killed_after, killed_after + 1)
    for failures in hit["failures"]:
        entries = failures.split("; ")
        assert all(e.startswith(("hospital-2 (train): ", "hospital-2 (evaluate): ")) for e in entries), entries  # named, never "node 1"
        assert len(entries) == len({e.split(":")[0] for e in entries})  # once per phase
        assert all(
            "no reply within quorum-grace (5 s) after 2 of 3 hospitals replied, going on after" in e or "node unavailable" in e for e in entries
        ), entries  # fmt: skip
    assert (hit["n_sites"] == 2).all() and (history["seconds"] < 120 + 30).all()  # the rounds went on within their bounds
    back = history[(history["round"] > hit["round"].max()) & (history["n_sites"] == 3)]
    assert len(back), history[["round", "n_sites", "failures"]]  # hospital-2 rejoined once restarted
    sites = pd.read_csv(folder / "sites.csv")
    assert "hospital-2" in set(sites[sites["round"] > hit["round"].max()]["site"])

    failed = ended["too-few"]
    assert isinstance(failed, rehearse.RunFailed), failed
    assert "fewer than min-hospitals = 3" in str(failed) and "hospital-2 (train): node unavailable: not connected when the phase began" in str(failed), failed
    status = json.loads((Path(few.output_dir) / "too-few" / "status.json").read_text())
    assert status["status"] == "failed" and "round 1" in status["reason"]
    assert took < 150, took  # waited node-wait twice, not for ever


def test_a_slow_hospital_is_left_behind_at_the_quorum_and_its_late_reply_is_recorded_as_late(tmp_path, own_flower_processes):
    app = make_attack_app(tmp_path / "app")
    settings = {
        "num-server-rounds": 6, "num-hospitals": 3, "images-per-hospital": 60, "heldout-images": 30, "image-size": 32, "min-bin-images": 2,
        "gradcam-images": 0, "round-quorum": 0.6, "quorum-grace": 2.0, "output-dir": str(tmp_path), "run-name": "slow",
    }  # fmt: skip
    # 2 s of grace: on 2 cores the third hospital often starts only when one of the first two is done, and under CI's
    # load an honest hospital-2 then needed more than 0.5 s after the second reply (it was left behind in round 2 too)
    folder = simulate.simulate(simulate.prepare(settings), app, {"attack-hospital": 2, "attack-plan": "slow"})
    history = pd.read_csv(folder / "history.csv", keep_default_na=False)
    assert history["round"].tolist() == list(range(7)) and history["n_sites"].tolist()[1] == 2
    assert "hospital-2 (train): no reply within quorum-grace (2 s) after 2 of 3 hospitals replied" in history["failures"][1]
    late = "; ".join(history["late_replies"])
    assert "hospital-2 (train, round 1): replied within" in late and "after the server went on, not used" in late, late
    received = pd.read_csv(folder / "received.csv")
    assert ((received["phase"] == "train-late") & (received["site"] == "hospital-2")).sum() == 1
    assert history["n_sites"].tolist()[2:] == [3] * 5  # back in time from round 2 on
    assert not own_flower_processes()
