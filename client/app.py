"""The hospital's ClientApp: train the shared CNN on local images; report counts and score histograms, never images.

The handlers stay light: the work itself (client/training.py, with TensorFlow) runs in this process, or, where the
node names a long-lived worker ('worker-socket', set by `python -m client.supernode`), in that worker, so that a
deployed hospital does not import TensorFlow and rebuild its pipeline for every message Flower sends it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common import wire
from common.audit import append_audit
from common.config import parse_run_config
from common.deployment import WORKER_SOCKET
from common.metrics import figures
from common.site_report import append_site_report

app = ClientApp()


def _work(kind: str, msg: Message, context: Context):
    """Run training.train or training.score on the global weights: in the node's worker, else in this process."""
    weights = msg.content[wire.ARRAYS].to_numpy_ndarrays()
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    socket = node_config.pop(WORKER_SOCKET, "")
    if socket:
        from client.worker import call  # light: the standard library's authenticated local connections

        return call(socket, kind, run_config, node_config, weights)
    from client import training  # TensorFlow loads here, once per process (a simulation worker keeps it)

    return getattr(training, kind)(run_config, node_config, weights)


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the global model on this hospital's training images and send back weights, image count, loss and the number
    of files it skipped as unreadable."""
    labels = parse_run_config(dict(context.run_config)).labels
    done = _work("train", msg, context)
    content = wire.pack_train_reply(done.site, labels, done.weights, done.num_examples, done.loss, done.skipped)
    return _reply(msg, content, context, _report_folder(msg, done.report_dir, done.site), done.site)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this hospital's validation images with the global model; send counts and histograms only.

    The hospital keeps its own report of how the global model does on its patients, round by round.
    """
    cfg = parse_run_config(dict(context.run_config))
    done = _work("score", msg, context)
    pos, neg = done.pos, done.neg
    folder = _report_folder(msg, done.report_dir, done.site)
    if folder is not None:
        append_site_report(folder, _server_round(msg), done.num_examples, figures(done.counts, pos, neg, cfg.labels), done.unreadable)
    if done.num_examples < cfg.min_histogram_images:  # too few patients: fine bins would come close to listing their scores
        pos = neg = None
    content = wire.pack_evaluate_reply(done.site, cfg.labels, done.num_examples, done.counts, pos, neg)
    return _reply(msg, content, context, folder, done.site)
