"""The hospital's ClientApp: train the shared CNN on local images; report score intervals and counts, never images.

The handlers stay light: the work itself (client/training.py, with TensorFlow) runs in this process, or, where the
node names a long-lived worker ('worker-socket', set by `python -m client.supernode`), in that worker, so that a
deployed hospital does not import TensorFlow and rebuild its pipeline for every message Flower sends it. Whatever
goes wrong is answered with one line naming the site (wire.error_reason), never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common import wire
from common.audit import append_audit
from common.config import parse_run_config
from common.deployment import WORKER_SOCKET
from common.site_data import node_site_file, node_site_name
from common.site_file import load_site_config
from common.site_report import append_site_report

app = ClientApp()


def _work(kind: str, msg: Message, context: Context, payload):
    """Run training.<kind> on the payload: in the node's worker, else in this process."""
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    socket = node_config.pop(WORKER_SOCKET, "")
    if socket:
        from client.worker import call  # light: the standard library's authenticated local connections

        return call(socket, kind, run_config, node_config, payload)
    from client import training  # TensorFlow loads here, once per process (a simulation worker keeps it)

    return getattr(training, kind)(run_config, node_config, payload)


def _report_folder(msg: Message, report_dir: Path | None, site: str) -> Path | None:
    """Where this site keeps its report and audit log: its site file's report-dir, else (a simulated hospital) its
    folder in the run folder the server names, else nowhere."""
    if report_dir is not None:
        return report_dir
    config = msg.content.config_records.get("config", {})
    return Path(config[wire.RUN_FOLDER]) / "hospitals" / site if wire.RUN_FOLDER in config else None


def _reply(msg: Message, content: RecordDict, context: Context, folder: Path | None, site: str) -> Message:
    """The reply to a message, written to the site's audit log before it leaves."""
    if folder is not None:
        append_audit(folder, content, context.run_id, _server_round(msg), msg.metadata.message_type, site)
    return Message(content=content, reply_to=msg)


def _server_round(msg: Message) -> int:
    """The round the server says this message belongs to (0 when it does not say)."""
    return int(msg.content.config_records.get("config", {}).get("server-round", 0))


def _failed(msg: Message, context: Context, exc: Exception) -> Message:
    """The reply to a message whose work failed: one line naming the site and what went wrong (see wire.error_reason)."""
    from client.worker import WorkerError

    site, root, report_dir = "unknown", "", None
    try:
        cfg = parse_run_config(dict(context.run_config))
        node_config = dict(context.node_config)
        site, path = node_site_name(cfg, node_config), node_site_file(cfg, node_config)
        if path:
            parsed = load_site_config(path)
            root, report_dir = str(parsed.data_root), parsed.report_dir
    except Exception:  # noqa: BLE001 - the run's settings or the site file are broken too: still answer in one line
        pass
    what = str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
    reason = wire.error_reason(site, what, root)
    print(f"fedimaging: {msg.metadata.message_type} failed: {reason}", flush=True)
    folder = _report_folder(msg, report_dir, site)
    if folder is not None:
        append_audit(folder, RecordDict(), context.run_id, _server_round(msg), msg.metadata.message_type, site, error=reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the global model on this hospital's training images and send back weights, image count, loss and the
    numbers of files it left out."""
    try:
        labels = parse_run_config(dict(context.run_config)).labels
        done = _work("train", msg, context, msg.content[wire.ARRAYS].to_numpy_ndarrays())
    except Exception as exc:  # noqa: BLE001 - any failure is answered in one line naming the site
        return _failed(msg, context, exc)
    content = wire.pack_train_reply(done.site, labels, done.weights, done.num_examples, done.loss, done.skipped, done.not_images)
    return _reply(msg, content, context, _report_folder(msg, done.report_dir, done.site), done.site)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this hospital's validation images with the global model; send its image count and the score intervals
    the histogram floor allows (applied in the hospital's own work, client/training.py), nothing per patient.

    The hospital keeps its own exact report of how the global model does on its patients, round by round.
    """
    try:
        cfg = parse_run_config(dict(context.run_config))
        done = _work("score", msg, context, msg.content[wire.ARRAYS].to_numpy_ndarrays())
    except Exception as exc:  # noqa: BLE001
        return _failed(msg, context, exc)
    folder = _report_folder(msg, done.report_dir, done.site)
    if folder is not None:
        append_site_report(folder, _server_round(msg), done.num_examples, done.own_figures, done.left_out)
    content = wire.pack_evaluate_reply(done.site, cfg.labels, done.num_examples, done.intervals)
    return _reply(msg, content, context, folder, done.site)


@app.query()
def overlap(msg: Message, context: Context) -> Message:
    """Answer the server's question before training: how many of this hospital's images equal one of its held-out
    images (keyed digests of decoded pixels; see wire.pack_overlap_query), and which held-out ones if it asks."""
    try:
        cfg = parse_run_config(dict(context.run_config))
        done = _work("overlap", msg, context, wire.read_overlap_query(msg.content))
    except Exception as exc:  # noqa: BLE001
        return _failed(msg, context, exc)
    content = wire.pack_overlap_reply(done.site, cfg.labels, done.count, done.rows)
    return _reply(msg, content, context, _report_folder(msg, done.report_dir, done.site), done.site)
