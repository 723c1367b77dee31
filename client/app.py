"""The hospital's ClientApp: the code the server ships, run for every message Flower sends the hospital.

It decides nothing and reads nothing of the hospital's: in deployment it hands each request to the hospital's worker
(node config 'worker-socket', set by `python -m client.supernode`; client/worker.py), runs as a user that cannot read
the images, and passes on what the hospital's own code answered (client/hospital.py): the reply's content, or one
line naming the site and what went wrong. In a simulation it calls the hospital's code itself. It imports no
TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common import wire
from common.deployment import SITE_NAME, WORKER_SOCKET

app = ClientApp()


def _meta(msg: Message, context: Context) -> dict:
    """What the hospital's audit log and report need to know of the message: run, round, and (a simulated hospital's)
    run folder."""
    config = msg.content.config_records.get("config", {})
    return {"run_id": int(context.run_id), "server_round": int(config.get("server-round", 0)), "run_folder": str(config.get(wire.RUN_FOLDER, ""))}


def _answer(kind: str, msg: Message, context: Context, payload_of: Callable[[Message], object]) -> Message:
    """The hospital's answer to a message, from its worker or (simulation) from its own code in this process."""
    node_config = dict(context.node_config)
    try:
        payload = payload_of(msg)
        if WORKER_SOCKET in node_config:
            from client.worker import call  # light: the standard library's authenticated local connections

            ok, result = call(node_config[WORKER_SOCKET], kind, dict(context.run_config), payload, _meta(msg, context))
        else:
            from client.hospital import answer

            ok, result = answer(kind, dict(context.run_config), node_config, payload, _meta(msg, context))
    except Exception as exc:  # noqa: BLE001 - the worker is gone, or the message is broken: still one line
        ok, result = False, wire.error_reason(str(node_config.get(SITE_NAME, "unknown")), f"{type(exc).__name__}: {exc}")
    if not ok:
        print(f"fedimaging: {msg.metadata.message_type} failed: {result}", flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=result), reply_to=msg)
    return Message(content=result, reply_to=msg)


def _weights(msg: Message) -> list:
    """The global weights a train or evaluate message carries."""
    return msg.content[wire.ARRAYS].to_numpy_ndarrays()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the hospital's images: weights, image count, loss and the numbers of files left out."""
    return _answer("train", msg, context, _weights)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the hospital's validation images: their count and the score intervals the histogram floor allows."""
    return _answer("score", msg, context, _weights)


@app.query()
def overlap(msg: Message, context: Context) -> Message:
    """Before training: how many of the hospital's images equal one of the server's held-out images (keyed digests of
    decoded pixels), and which held-out ones if the server asks."""
    return _answer("overlap", msg, context, lambda m: wire.read_overlap_query(m.content))
