"""What a hospital answers, decided by the hospital's own code: its policy checked, its local work done
(client/training.py), the reply packed with only what may leave, and every answer, refusals included, written to its
audit log before it is handed over.

In deployment this runs in the hospital's long-lived worker (client/worker.py), the one process that reads the images;
the per-message ClientApp processes the server's app starts only pass the answer on. In a simulation the ClientApp
calls it directly.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from flwr.app import RecordDict

from common import wire
from common.audit import append_audit, read_audit
from common.config import RUN_SETTINGS, parse_run_config
from common.errors import ConfigError
from common.site_data import node_site_file, node_site_name
from common.site_file import SiteConfig, load_site_config
from common.site_report import append_site_report

KINDS = ("train", "score", "overlap")
REPLY_TYPES = {"train": "train", "score": "evaluate", "overlap": "query"}  # the Flower message each kind answers


class PolicyError(RuntimeError):
    """A request the hospital's policy (its site file's 'policy') does not accept; the message says which rule."""


def check_policy_names(site: SiteConfig) -> None:
    """ConfigError, at start, where the policy names a run setting that does not exist (a typo would refuse every run)."""
    unknown = sorted(set(site.policy.run_settings) - set(RUN_SETTINGS))
    if unknown:
        raise ConfigError(f"site file {site.path}: 'policy.run-settings' names unknown run setting(s) {', '.join(map(repr, unknown))}; known settings: {', '.join(RUN_SETTINGS)}")


def check_policy(site: SiteConfig, kind: str, run_config: dict, folder: Path | None) -> None:
    """Refuse, in one line, a request the hospital's policy does not accept: a run setting outside the accepted values,
    or more training rounds in 24 hours than it allows."""
    policy = site.policy
    for key, accepted in policy.run_settings.items():
        if key not in run_config:
            raise PolicyError(f"this hospital's policy names run setting {key!r}, which the run does not have")
        if run_config[key] not in accepted:
            raise PolicyError(f"run setting {key!r} = {run_config[key]!r} is not accepted by this hospital (accepted: {', '.join(map(repr, accepted))})")
    if kind == "train" and policy.max_rounds_per_day and folder is not None:
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
        done = [e for e in read_audit(folder) if e["type"] == "train" and "error" not in e and dt.datetime.fromisoformat(e["time"]) > since]
        if len(done) >= policy.max_rounds_per_day:
            raise PolicyError(f"{len(done)} training rounds answered in the last 24 hours: this hospital's policy allows {policy.max_rounds_per_day}")


def _report_folder(site: SiteConfig | None, run_folder: str, name: str) -> Path | None:
    """Where this hospital keeps its report and audit log: its site file's report-dir, else (a simulated hospital) its
    folder in the run folder the server names, else nowhere."""
    if site is not None and site.report_dir is not None:
        return site.report_dir
    return Path(run_folder) / "hospitals" / name if run_folder else None


def _pack(kind: str, done, labels: tuple[str, ...]) -> RecordDict:
    """The reply's content: only what wire.py lets a hospital send."""
    if kind == "train":
        return wire.pack_train_reply(done.site, labels, done.weights, done.num_examples, done.loss, done.skipped, done.not_images)
    if kind == "score":
        return wire.pack_evaluate_reply(done.site, labels, done.num_examples, done.intervals)
    return wire.pack_overlap_reply(done.site, labels, done.count, done.rows)


def answer(kind: str, run_config: dict, node_config: dict, payload, meta: dict) -> tuple[bool, RecordDict | str]:
    """(True, the reply's content) or (False, one line saying what went wrong, naming the site); either is in the
    hospital's audit log first. meta: run_id, server_round, run_folder (where a simulated hospital reports)."""
    site, name, root, folder = None, "unknown", "", None
    try:
        cfg = parse_run_config(dict(run_config))
        name, path = node_site_name(cfg, node_config), node_site_file(cfg, node_config)
        site = load_site_config(path) if path else None
        root = str(site.data_root) if site is not None else ""
        folder = _report_folder(site, meta.get("run_folder", ""), name)
        if kind not in KINDS:
            raise ValueError(f"unknown request {kind!r}: expected one of {', '.join(KINDS)}")
        if site is not None:
            check_policy(site, kind, run_config, folder)
        from client import training  # TensorFlow loads here, once per process

        rnd = (int(meta.get("server_round", 0)),) if kind == "train" else ()  # a round's training draws by its number
        done = getattr(training, kind)(run_config, node_config, payload, *rnd)
        content = _pack(kind, done, cfg.labels)
        if kind == "score" and folder is not None:
            append_site_report(folder, meta.get("server_round", 0), done.num_examples, done.own_figures, done.left_out)
    except Exception as exc:  # noqa: BLE001 - every failure is answered in one line naming the site
        line = wire.error_reason(name, f"{type(exc).__name__}: {exc}", root)
        if folder is not None:
            append_audit(folder, RecordDict(), meta.get("run_id", 0), meta.get("server_round", 0), REPLY_TYPES.get(kind, kind), name, error=line)
        return False, line
    if folder is not None:
        append_audit(folder, content, meta.get("run_id", 0), meta.get("server_round", 0), REPLY_TYPES[kind], name)
    return True, content
