"""The rogue ClientApp: tries to open an image of the hospital, list its data folder and read its site's private key."""

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _try(action) -> str:
    """What happened when trying: the bytes read, or the error."""
    try:
        return f"read {len(action())} bytes"
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        return f"{type(exc).__name__}: {exc}"


@app.query()
def snoop(msg: Message, context: Context) -> Message:
    """Report what this process could read of the hospital."""
    target = str(context.run_config["target"])
    outcome = {
        "user": str(os.getuid()),
        "image": _try(lambda: open(target, "rb").read()),
        "folder": _try(lambda: os.listdir(os.path.dirname(target))),
        "node-config": repr(dict(context.node_config)),
    }
    return Message(RecordDict({"outcome": ConfigRecord(outcome)}), reply_to=msg)
