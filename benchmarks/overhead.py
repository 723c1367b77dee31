"""Where a federated round's time goes: the Flower simulation against a plain Keras loop doing the same work in one
process, and the deployment rehearsal on loopback, against the same rehearsal of an earlier commit where asked.

    .venv/bin/python benchmarks/overhead.py                       # about 6 min on 2 cores
    .venv/bin/python benchmarks/overhead.py --rehearsal-baseline 1370d23   # and the rehearsal as it was at that commit
    .venv/bin/python benchmarks/overhead.py --rounds 2 --images 60 --skip-rehearsal

Simulation and plain loop do the same work: H built-in hospitals of N images at 64x64, E local epochs, R rounds; each
round every hospital trains, every hospital scores its validation images, the server scores its held-out set (the
Grad-CAM check is off in both). Rounds are timed apart from start-up; round 1 also holds each process's first graph
tracing, so the per-round figures are the mean of rounds 2..R. The rehearsal (python -m server.rehearse: nginx in front
of the SuperLink, TLS and node authentication, 2 hospitals of 100 images at 32x32, each with its long-lived worker and
the server's code run as the ClientApp user where this runs as root) runs once; with --rehearsal-baseline, the same
rehearsal is first run from a git worktree of that commit (its own code, this environment), so that the two round
times come from one run of this benchmark.

Ratios compare like with like only: the simulation against the plain loop (same work), the rehearsal against its
baseline. `core` is a round without the server's model saving and plots, which the plain loop does not do.

Writes benchmarks/results/overhead.csv (one row per setting), overhead-profile.csv (seconds per phase of a round) and
overhead.png; prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from measure import steady_mean

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
PHASES = ("train", "evaluate", "heldout", "gradcam", "record")


def settings(hospitals: int, images: int, rounds: int, epochs: int) -> dict:
    """The run settings both the simulation and the plain loop follow."""
    return {"num-hospitals": hospitals, "min-hospitals": hospitals, "images-per-hospital": images, "num-server-rounds": rounds,
            "local-epochs": epochs, "image-size": 64, "gradcam-images": 0}  # fmt: skip


def plain_loop(overrides: dict) -> dict:
    """FedAvg in one process with plain Keras, the same steps as the federation: timings per phase and round."""
    sys.path.insert(0, str(PROJECT))
    import keras
    import numpy as np

    from common.config import parse_run_config, project_settings
    from common.metrics import statistics
    from common.model import reset_optimizer, run_model, weigh_classes
    from common.partition import hospital_data
    from common.pipeline import dataset
    from common.runtime import configure_tensorflow
    from common.site_data import server_heldout
    from server.aggregation import weighted_mean
    from server.evaluation import evaluate_heldout

    cfg = parse_run_config({**project_settings(), **overrides}, base_dir=PROJECT)
    configure_tensorflow(os.cpu_count() or 1)
    keras.utils.set_random_seed(cfg.seed)
    sites = [hospital_data(cfg, h) for h in range(cfg.num_hospitals)]
    pipelines = [(dataset(train, cfg, training=True, seed=cfg.seed), dataset(val, cfg, training=False)) for train, val in sites]
    heldout = server_heldout(cfg)
    server, client = run_model(cfg), run_model(cfg)
    weights = server.get_weights()
    rounds = []
    for _ in range(cfg.num_server_rounds):
        phases = {}
        t = time.perf_counter()
        updates = []
        for (train, _), (train_ds, _) in zip(sites, pipelines):
            client.set_weights(weights)
            reset_optimizer(client)
            weigh_classes(client, train.labels, cfg.class_weighting)
            client.fit(train_ds, epochs=cfg.local_epochs, shuffle=False, verbose=0)
            updates.append(client.get_weights())
        weights = [w.astype(np.float32) for w in weighted_mean(updates, [len(train) for train, _ in sites])]
        phases["train"] = time.perf_counter() - t
        t = time.perf_counter()
        client.set_weights(weights)
        for (_, val), (_, val_ds) in zip(sites, pipelines):
            statistics(client.predict(val_ds, verbose=0), val.labels, cfg.threshold, cfg.histogram_bins)
        phases["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        server.set_weights(weights)
        evaluate_heldout(server, heldout, cfg, None)
        phases["heldout"] = time.perf_counter() - t
        rounds.append(phases)
    return {"rounds": rounds, "model_bytes": int(sum(w.nbytes for w in weights))}


def run_simulation(overrides: dict, workdir: Path) -> dict:
    """The same work through `python -m server.simulate`: wall time, the rounds' phases from history.csv, bytes received."""
    name = f"overhead-{time.strftime('%H%M%S')}"
    text = " ".join(f"{k}={v}" for k, v in {**overrides, "output-dir": f"'{workdir}'", "run-name": f"'{name}'"}.items())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "server.simulate", "-c", text], cwd=PROJECT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the simulation failed:\n{done.stderr[-3000:]}")
    return {"wall": wall, **_run_folder_figures(workdir / name)}


def run_rehearsal(workdir: Path, rounds: int, code: Path = PROJECT) -> dict:
    """`python -m server.rehearse` of the code in `code` (this checkout, or a worktree of an earlier commit), 2 hospitals."""
    command = [sys.executable, "-m", "server.rehearse", "--hospitals", "2", "--rounds", str(rounds), "--workdir", str(workdir)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=code, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the rehearsal of {code} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    folder = next((workdir / "runs").iterdir())
    return {"wall": wall, **_run_folder_figures(folder)}


def rehearsals(tmp: Path, rounds: int, baseline: str | None) -> list[tuple[str, dict]]:
    """The rehearsal at the baseline commit (where given) and as this checkout has it, one after the other."""
    runs = []
    if baseline:
        tree = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), baseline], cwd=PROJECT, check=True, capture_output=True)
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=PROJECT, capture_output=True, text=True).stdout.strip()
            print(f"rehearsal at {commit} ...", flush=True)
            runs.append((f"rehearsal at {commit}", run_rehearsal(tmp / "rehearsal-baseline", rounds, tree)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=PROJECT, capture_output=True)
    print("rehearsal ...", flush=True)
    runs.append(("rehearsal", run_rehearsal(tmp / "rehearsal", rounds)))
    return runs


def _run_folder_figures(folder: Path) -> dict:
    """Per-round phases (rounds 1..R) and bytes per reply from a run folder."""
    history = pd.read_csv(folder / "history.csv")
    history = history[history["round"] > 0]
    rounds = [{p: float(r.get(f"seconds_{p}", 0.0)) for p in PHASES} | {"total": float(r["seconds"])} for _, r in history.iterrows()]
    received = pd.read_csv(folder / "received.csv")
    return {"rounds": rounds, "bytes": received.groupby("phase")["bytes"].mean().to_dict(), "folder": str(folder)}


def row(name: str, wall: float, rounds: list[dict]) -> dict:
    """A results row: first round, steady rounds (whole, and without saving models and plots), and the fixed start-up
    (wall time outside the rounds)."""
    totals = [r.get("total", sum(r.values())) for r in rounds]
    core = [sum(r.get(p, 0.0) for p in ("train", "evaluate", "heldout")) for r in rounds]
    return {"setting": name, "rounds": len(rounds), "wall_s": wall, "first_round_s": totals[0], "steady_round_s": steady_mean(totals),
            "steady_core_s": steady_mean(core), "startup_s": wall - sum(totals)}  # fmt: skip


def profile(name: str, rounds: list[dict]) -> list[dict]:
    """Seconds per phase of a steady round, and what is left outside the phases."""
    out = [{"setting": name, "phase": p, "seconds": steady_mean([r.get(p, 0.0) for r in rounds])} for p in PHASES if any(p in r for r in rounds)]
    total = steady_mean([r.get("total", sum(v for k, v in r.items() if k in PHASES)) for r in rounds])
    out.append({"setting": name, "phase": "other", "seconds": max(0.0, total - sum(o["seconds"] for o in out))})
    return out


def plot(prof: pd.DataFrame, path: Path) -> None:
    """Stacked bars: a steady round's seconds by phase for each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = prof.pivot_table(index="setting", columns="phase", values="seconds", aggfunc="sum", sort=False).fillna(0.0)
    table = table[[p for p in (*PHASES, "other") if p in table.columns]]
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(table) + 1.6))
    table.plot.barh(stacked=True, ax=ax, colormap="tab10", width=0.6)
    ax.invert_yaxis()
    ax.set(xlabel="seconds per round (mean of rounds 2..R)", ylabel="", title="Where a federated round's time goes")
    ax.legend(fontsize=8, loc="lower right", title="phase", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the settings, print the tables, write the CSVs and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--images", type=int, default=600, help="images per hospital")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--rehearsal-rounds", type=int, default=3)
    parser.add_argument("--skip-rehearsal", action="store_true")
    parser.add_argument("--rehearsal-baseline", help="a git commit whose rehearsal runs first, for a before/after round time")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)  # internal: run the plain loop on these JSON settings
    args = parser.parse_args(argv)
    if args.plain_loop:
        print(json.dumps(plain_loop(json.loads(args.plain_loop))))
        return 0
    overrides = settings(args.hospitals, args.images, args.rounds, args.local_epochs)
    rows, prof = [], []
    with tempfile.TemporaryDirectory(prefix="fedimaging-overhead-") as tmp:
        print("plain Keras loop ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--plain-loop", json.dumps(overrides)], cwd=PROJECT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the plain loop failed:\n{done.stderr[-3000:]}")
        plain = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row("plain Keras loop", time.perf_counter() - started, plain["rounds"]) | {"model_bytes": plain["model_bytes"]})
        prof += profile("plain Keras loop", plain["rounds"])
        print("Flower simulation ...", flush=True)
        sim = run_simulation(overrides, Path(tmp) / "runs")
        rows.append(row("Flower simulation", sim["wall"], sim["rounds"]) | _bytes(sim, plain["model_bytes"]))
        prof += profile("Flower simulation", sim["rounds"])
        if not args.skip_rehearsal:
            for name, rehearsal in rehearsals(Path(tmp), args.rehearsal_rounds, args.rehearsal_baseline):
                rows.append(row(name, rehearsal["wall"], rehearsal["rounds"]) | _bytes(rehearsal, None))
                prof += profile(name, rehearsal["rounds"])
    table, prof_table = pd.DataFrame(rows), pd.DataFrame(prof)
    same_work = table.index < 2  # plain loop and simulation; the rehearsals do other work, compared among themselves
    table["core_vs_plain"] = (table["steady_core_s"] / table["steady_core_s"].iloc[0]).where(same_work)
    table["round_vs_plain"] = (table["steady_round_s"] / table["steady_round_s"].iloc[0]).where(same_work)
    if args.rehearsal_baseline and not args.skip_rehearsal:
        table["round_vs_baseline"] = (table["steady_round_s"] / table["steady_round_s"].iloc[2]).where(~same_work)
    table.insert(1, "work", [f"{args.hospitals} hospitals x {args.images} images, 64x64, {args.local_epochs} epochs"] * 2
                 + ["2 hospitals x 100 images, 32x32, 2 epochs, TLS"] * (len(table) - 2))  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "overhead.csv", index=False, float_format="%.3f")
    prof_table.to_csv(args.results / "overhead-profile.csv", index=False, float_format="%.3f")
    plot(prof_table, args.results / "overhead.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(prof_table.pivot_table(index="setting", columns="phase", values="seconds", sort=False).to_string(float_format=lambda v: f"{v:.2f}"))
    return 0


def _bytes(run: dict, model_bytes: int | None) -> dict:
    """Mean bytes of a hospital's train and evaluate replies per round."""
    out = {"train_reply_bytes": run["bytes"].get("train", float("nan")), "evaluate_reply_bytes": run["bytes"].get("evaluate", float("nan"))}
    return out | ({"model_bytes": model_bytes} if model_bytes is not None else {})


if __name__ == "__main__":
    sys.exit(main())
