"""How soon a written round appears on the monitor's page, and what the page costs in memory.

    .venv/bin/python benchmarks/monitor.py                     # makes a 6-round run first (about 2 min)
    .venv/bin/python benchmarks/monitor.py --run runs/<run-id>  # replays an existing run folder

A copy of a finished run folder is cut back to round 0 and its rounds written again one by one, as the ServerApp
writes them (tables, then status.json), every --every seconds, while `fedimaging monitor` serves it and Debian's
headless Chromium shows the run page. For each round: the seconds from the status being written to the round's row
being on the page. At the end: the page's JavaScript heap, the browser's and the monitor's resident memory. Writes
benchmarks/results/monitor.csv (per round) and monitor-summary.csv; prints both.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
sys.path.insert(0, str(PROJECT))
from common.atomic import write_csv, write_text  # noqa: E402

TABLES = ("history.csv", "sites.csv", "received.csv")


def make_run(output: Path) -> Path:
    """A 6-round, 4-hospital simulation on the built-in data, as a user runs it."""
    settings = f"num-server-rounds=6 num-hospitals=4 images-per-hospital=150 image-size=32 output-dir='{output}' run-name='bench'"
    done = subprocess.run([str(Path(sys.executable).with_name("fedimaging")), "simulate", "-c", settings], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the simulation failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return output / "bench"


def write_round(source: Path, target: Path, rnd: int, last: int) -> None:
    """Write the run folder as it stood after round rnd: the tables, then the status (as the ServerApp does)."""
    for name in TABLES:
        table = pd.read_csv(source / name)
        write_csv(target / name, table[table["round"] <= rnd])
    status = json.loads((source / "status.json").read_text())
    now = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
    ended = {} if rnd == last else {"status": "running", "reason": ""}
    write_text(target / "status.json", json.dumps(status | {"last_round": rnd, "updated": now} | ended))


def rss(process: psutil.Process, tree: bool = False) -> float:
    """Resident memory in MiB of a process (and its children)."""
    procs = [process, *process.children(recursive=True)] if tree else [process]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> int:
    """Replay the run's rounds under the monitor and a browser; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder to replay (default: make one)")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between rounds written (default 3)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as work:
        work = Path(work)
        source = args.run.resolve() if args.run else make_run(work / "made")
        runs = work / "runs"
        shutil.copytree(source, runs / "live", ignore=shutil.ignore_patterns("tensorboard", "hospitals", "checkpoint.npz"))
        last = int(pd.read_csv(source / "history.csv")["round"].max())
        write_round(source, runs / "live", 0, last)
        monitor = subprocess.Popen([sys.executable, "-m", "server.monitor", str(runs), "--port", "0"], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000", "--enable-precise-memory-info"):
            options.add_argument(argument)
        driver = None
        try:
            url = re.search(r"(http://\S+/)", monitor.stdout.readline()).group(1)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
            driver.get(f"{url}#/run/live")
            rows = []
            for rnd in range(1, last + 1):
                time.sleep(args.every)
                write_round(source, runs / "live", rnd, last)
                written = time.monotonic()
                while not driver.execute_script(f"return !!document.querySelector(\"#round-table tr[data-round='{rnd}']\")"):
                    if time.monotonic() - written > 30:
                        raise RuntimeError(f"round {rnd} did not appear on the page within 30 s")
                    time.sleep(0.02)
                rows.append({"round": rnd, "seconds_to_page": time.monotonic() - written})
                print(f"round {rnd}/{last} on the page after {rows[-1]['seconds_to_page']:.2f} s", flush=True)
            heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
            browser = psutil.Process(driver.service.process.pid)
            summary = {
                "rounds": last, "hospitals": len(pd.read_csv(source / "sites.csv")["site"].unique()),
                "median_seconds_to_page": pd.Series([r["seconds_to_page"] for r in rows]).median(),
                "max_seconds_to_page": max(r["seconds_to_page"] for r in rows), "poll_seconds": 2.0,
                "page_js_heap_mib": heap / 2**20 if heap else float("nan"), "browser_rss_mib": rss(browser, tree=True),
                "monitor_rss_mib": rss(psutil.Process(monitor.pid)),
            }  # fmt: skip
        finally:
            if driver is not None:
                driver.quit()
            monitor.terminate()
            monitor.wait(10)
    args.results.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.results / "monitor.csv", index=False, float_format="%.3f")
    pd.DataFrame([summary]).to_csv(args.results / "monitor-summary.csv", index=False, float_format="%.3f")
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.2f"))
    print(pd.DataFrame([summary]).T.to_string(header=False, float_format="%.2f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
