"""The monitor: its reading of run folders (finished, running, half-written, crashed), who it answers, and its page
driven in Debian's headless Chromium (through chromedriver) over a real run folder written by `fedimaging simulate`."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from common.atomic import write_csv, write_text
from server.monitor import MonitorConfig, check_exposure, make_server
from server.run_reader import StallRule, detail, list_runs, run_state, summary

PROJECT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.xdist_group("finished-run")  # the tests that read the session's one small run share a worker
ARTIFACTS = Path(os.environ.get("FEDIMAGING_TEST_ARTIFACTS", PROJECT / "tests" / "artifacts"))


def _fmt(value: float) -> str:
    """A figure as the page shows it."""
    return "–" if pd.isna(value) else f"{value:.3f}"


def _cut(folder: Path, last_round: int) -> None:
    """Make a finished run folder look as it did while running after last_round (its tables cut there)."""
    for name in ("history.csv", "sites.csv", "received.csv"):
        table = pd.read_csv(folder / name)
        write_csv(folder / name, table[table["round"] <= last_round])
    status = json.loads((folder / "status.json").read_text())
    now = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
    write_text(folder / "status.json", json.dumps(status | {"status": "running", "reason": "", "last_round": last_round, "updated": now}))


@pytest.fixture
def runs(finished_run, tmp_path):
    """A runs folder as an operator's looks: the finished run, one still running (after round 1), a half-written one
    (settings and status only, just started) and a crashed one (running, silent for an hour)."""
    folder = finished_run[0]
    assert finished_run[2] == 0, finished_run[1]
    root = tmp_path / "runs"
    root.mkdir()
    ignore = shutil.ignore_patterns("checkpoint.npz", "tensorboard", "hospitals")
    for name in ("finished", "live", "crashed"):
        shutil.copytree(folder, root / name, ignore=ignore)
    _cut(root / "live", 1)
    _cut(root / "crashed", 1)
    status = json.loads((root / "crashed" / "status.json").read_text())
    hour_ago = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=1)).isoformat(timespec="seconds")
    write_text(root / "crashed" / "status.json", json.dumps(status | {"updated": hour_ago}))
    (root / "half").mkdir()
    shutil.copy(folder / "config.json", root / "half" / "config.json")
    now = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
    write_text(root / "half" / "status.json", json.dumps({"status": "running", "last_round": -1, "num_rounds": 2, "started": now, "updated": now}))
    (root / "notes").mkdir()  # a folder that is not a run: not listed
    return root, folder


@pytest.fixture
def monitor(runs):
    """The monitor serving the runs folder on a free loopback port, in this process; stopped afterwards."""
    root, _ = runs
    server = make_server(MonitorConfig(root, port=0))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_the_runs_read_as_they_stand(runs):
    root, original = runs
    listed = {run["name"]: run for run in list_runs(root)}
    assert set(listed) == {"finished", "live", "crashed", "half"}
    history = pd.read_csv(original / "history.csv")
    finished = listed["finished"]
    assert (finished["state"], finished["last_round"], finished["num_rounds"]) == ("finished", 2, 2)
    assert finished["best_pooled_auc"] == pytest.approx(history["global_auc"][1:].max())
    assert finished["heldout_auc"] == pytest.approx(history["heldout_auc"].iloc[-1])
    assert finished["hospitals"] == ["hospital-0", "hospital-1", "hospital-2"] and finished["settings"]["num-hospitals"] == 3
    assert (listed["live"]["state"], listed["live"]["last_round"]) == ("running", 1)
    assert listed["crashed"]["state"] == "stalled" and "no new round for" in listed["crashed"]["why"]
    assert listed["half"]["state"] == "running"
    later = time.time() + StallRule().first + 1  # a run that never wrote a round is stalled after `first` seconds
    assert summary(root / "half", now=later)["state"] == "stalled"
    for name, moment in [(name, None) for name in listed] + [("half", later)]:  # the page's cheap poll agrees with the table
        assert run_state(root / name, now=moment) == summary(root / name, now=moment)["state"], name
    half = detail(root / "half")
    assert half["history"] == [] and any(m.startswith("history.csv: not written") for m in half["missing"])
    live = detail(root / "live")
    assert [row["round"] for row in live["history"]] == [0, 1] and live["eta_seconds"] > 0
    assert set(live["pictures"]) == {"1"} and {h["site"] for h in live["hospitals"]} == {"hospital-0", "hospital-1", "hospital-2"}


def test_a_broken_table_is_said_not_fatal(runs):
    root, _ = runs
    (root / "finished" / "sites.csv").write_bytes(b"\x00\xff garbage\n\"unclosed")
    (root / "finished" / "status.json").write_text("{not json")
    run = detail(root / "finished")
    assert run["state"] == "unknown" and any("sites.csv" in m for m in run["missing"]) and len(run["history"]) == 3


def test_a_damaged_run_folder_shows_what_it_can_and_hides_no_other(runs, tmp_path):
    root, _ = runs
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"secret": "not for the page"}))
    damaged = {
        "listed": ("status.json", "[1, 2, 3]"),  # JSON, but not an object
        "wordy": ("history.csv", "round,global_auc,seconds\nzero,0.5,x\n1,0.7,3\n"),  # a round that is not a number
        "nan": ("config.json", '{"num-server-rounds": NaN, "labels": "lesion"}'),
    }
    for name, (file, text) in damaged.items():
        shutil.copytree(root / "finished", root / name)
        (root / name / file).write_text(text)
    shutil.copytree(root / "finished", root / "linked")
    (root / "linked" / "config.json").unlink()
    (root / "linked" / "config.json").symlink_to(outside)
    listed = {run["name"]: run for run in list_runs(root)}
    assert {"finished", "listed", "wordy", "nan", "linked"} <= set(listed)
    assert listed["listed"]["state"] == "unknown" and listed["wordy"]["last_round"] == 2
    wordy = detail(root / "wordy")
    assert [row["round"] for row in wordy["history"]] == [1] and any("1 row(s) without a round number" in m for m in wordy["missing"])
    assert detail(root / "nan")["config"]["num-server-rounds"] is None  # NaN in a file becomes null, never invalid JSON
    linked = detail(root / "linked")
    assert linked["config"] == {} and "config.json: a link to outside the run folder, not read" in linked["missing"]
    json.dumps([detail(root / name) for name in listed], allow_nan=False)  # every answer is valid JSON


def _get(url: str, **headers) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context() if url.startswith("https") else None) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_monitor_serves_only_run_files_and_only_to_its_own_address(monitor):
    url, root = monitor
    assert _get(f"{url}/api/runs")[0] == 200
    assert _get(f"{url}/files/finished/plots/round_001.png")[0] == 200
    assert _get(f"{url}/files/finished/plots/round_001.png%00.png")[0] == 400
    for path in ("/files/finished/../live/config.json", "/files/finished/%2e%2e/%2e%2e/etc/passwd", "/files/finished/model_best.keras",
                 "/files/finished/received.csv", "/files/finished/config.json",
                 "/static/../monitor.py", "/api/runs/..%2f..%2fetc", "/api/runs/notes"):
        assert _get(url + path)[0] == 404, path
    assert _get(f"{url}/api/runs", Host="attacker.example:80")[0] == 403  # DNS rebinding: another name for this address
    request = urllib.request.Request(f"{url}/api/runs", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405


def test_beyond_loopback_the_monitor_needs_tls_and_a_token(tmp_path, runs):
    root, _ = runs
    with pytest.raises(ValueError, match="needs --certfile and --keyfile .TLS. and a token"):
        check_exposure(MonitorConfig(root, host="0.0.0.0"))
    done = subprocess.run([sys.executable, "-m", "server.monitor", str(root), "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "reaches beyond this machine" in done.stderr
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "server.monitor", str(tmp_path / "a-file")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a folder" in done.stderr
    certs = tmp_path / "certs"
    for step in (["ca"], ["superlink", "--hosts", "127.0.0.1"]):
        subprocess.run([sys.executable, str(PROJECT / "deploy" / "certificates.py"), step[0], "--out", str(certs), *step[1:]], check=True, capture_output=True)
    token = "a-long-enough-test-token-0123456789"
    server = make_server(MonitorConfig(root, "0.0.0.0", 0, token, certs / "superlink.crt", certs / "superlink.key"))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        assert _get(f"{url}/api/runs")[0] == 401
        assert _get(f"{url}/api/runs?token=wrong")[0] == 401
        assert _get(f"{url}/api/runs?token=%C3%A9")[0] == 401  # not ASCII: refused, not a dropped connection
        connection = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], context=ssl._create_unverified_context(), timeout=10)
        connection.request("GET", f"/?token={token}")
        moved = connection.getresponse()  # the token leaves the address bar (and the history) for a cookie
        assert moved.status == 303 and moved.getheader("Location") == "/" and f"fedimaging_monitor={token}; HttpOnly" in moved.getheader("Set-Cookie")
        connection.close()
        assert _get(f"{url}/api/runs", Authorization=f"Bearer {token}")[0] == 200
        assert _get(f"{url}/files/finished/plots/round_001.png", Cookie=f"fedimaging_monitor={token}")[0] == 200
        stalled = __import__("socket").create_connection(("127.0.0.1", server.server_address[1]))  # a client that never shakes hands
        assert _get(f"{url}/api/runs", Authorization=f"Bearer {token}")[0] == 200  # holds up no one
        stalled.close()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port gets no page
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/api/runs", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def browser():
    """Debian's chromium, headless, driven through Debian's chromedriver (no browser download at run time)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 20.0, what: str = ""):
    """Wait until condition(driver) is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=what)


def _open(driver, url: str, run: str) -> None:
    """Go to a run's page (a change of the address's #, as a click does) and wait until it shows that run."""
    driver.get(f"{url}/#/run/{run}")
    _wait(driver, lambda d: d.title.startswith(f"{run} · "), what=f"the page of {run}")


def _text(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).text


def test_the_page_shows_the_run_folders_figures_and_follows_a_running_run(monitor, browser, runs):
    from selenium.webdriver.common.by import By

    url, root = monitor
    _, original = runs
    before = _listing(root)
    history, sites = pd.read_csv(original / "history.csv"), pd.read_csv(original / "sites.csv")

    browser.get(f"{url}/#/")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 4, what="the runs table")
    row = "#runs-table tr[data-run='finished']"
    assert _text(browser, f"{row} [data-state]") == "finished" and _text(browser, f"{row} .rounds") == "2 of 2"
    assert _text(browser, f"{row} .best-auc") == _fmt(history["global_auc"][1:].max())
    assert _text(browser, f"{row} .heldout-auc") == _fmt(history["heldout_auc"].iloc[-1])
    assert _text(browser, "#runs-table tr[data-run='crashed'] [data-state]") == "stalled"

    _open(browser, url, "finished")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#round-table tr[data-round='2']"), what="the run page")
    assert _text(browser, "#run-rounds") == "2 of 2" and _text(browser, "#run-heldout-auc") == _fmt(history["heldout_auc"].iloc[-1])
    for _, r in history.iterrows():
        for name in ("global_auc", "heldout_auc", "worst_site_auc"):
            assert _text(browser, f"#round-table tr[data-round='{r['round']}'] td[data-col='{name}']") == _fmt(r[name]), (r["round"], name)
    last = sites[sites["round"] == 2]
    for _, s in last.iterrows():
        assert _text(browser, f"#hospitals-table tr[data-site='{s['site']}'] td[data-col='n_train']") == str(int(s["n_train"]))
        assert _text(browser, f"#hospitals-table tr[data-site='{s['site']}'] td[data-col='rounds']") == "2 of 2"
    _wait(browser, lambda d: d.execute_script(
        "return ['round-report', 'round-gradcam'].every(id => { const i = document.getElementById(id); return i && i.complete && i.naturalWidth > 0; })"
    ), what="the round's pictures")  # fmt: skip
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-auc .main-svg") and browser.find_elements(By.CSS_SELECTOR, "#hospital-charts .main-svg")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 40)
    browser.save_screenshot(str(ARTIFACTS / "monitor-run.png"))
    pdf = base64.b64decode(browser.print_page())  # the page as Chromium prints it (print stylesheet: no controls)
    assert pdf.startswith(b"%PDF") and len(pdf) > 50_000
    (ARTIFACTS / "monitor-run.pdf").write_bytes(pdf)

    browser.set_window_size(1400, 1000)
    _open(browser, url, "live")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#round-table tr[data-round='1']"), what="the live run")
    assert _text(browser, "#run-rounds") == "1 of 2" and _text(browser, "#run-eta") != "–"
    browser.execute_script("window.notReloaded = true")
    for name in ("history.csv", "sites.csv", "received.csv"):  # round 2 is written, as the ServerApp writes it: tables, then status
        shutil.copy(original / name, root / "live" / name)
    write_text(root / "live" / "status.json", (original / "status.json").read_text())
    written = time.monotonic()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#round-table tr[data-round='2']"), timeout=15, what="round 2 on the page")
    print(f"round 2 appeared on the page {time.monotonic() - written:.1f} s after it was written")
    assert browser.execute_script("return window.notReloaded === true")  # no reload: the page fetched the change
    _wait(browser, lambda d: _text(d, "#run-rounds") == "2 of 2" and _text(d, "[data-state]") == "finished", what="the finished state")

    _open(browser, url, "half")
    _wait(browser, lambda d: d.find_elements(By.ID, "missing"), what="the half-written run")
    assert "history.csv: not written yet" in _text(browser, "#missing") and _text(browser, "#run-rounds") == "0 of 2"
    _open(browser, url, "crashed")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-state='stalled']"), what="the crashed run")
    assert "no new round for" in _text(browser, "#run-why")

    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no refused resource
    after = _listing(root)
    changed = {name for name in after if name.startswith("live/")}  # the test's own writes
    assert {k: v for k, v in after.items() if k not in changed} == {k: v for k, v in before.items() if k not in changed}  # read-only
