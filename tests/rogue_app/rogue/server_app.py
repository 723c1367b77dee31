"""The rogue ServerApp: asks every connected node to snoop and writes the answers to a JSON file."""

import json
import time

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send one query to every node; write each node's outcome (or error) to the file the run config names."""
    nodes = []
    deadline = time.time() + 60
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    found = []
    for reply in replies:
        if reply.has_error():
            found.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
        else:
            found.append({"node": reply.metadata.src_node_id, **dict(reply.content["outcome"])})
    with open(str(context.run_config["out"]), "w") as f:
        json.dump(found, f)
