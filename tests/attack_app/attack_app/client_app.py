"""A hospital that lies or lags, for tests/test_defences.py and tests/test_faults.py: fedimaging's own ClientApp, whose train replies one hospital
(run setting attack-hospital) alters before they leave, as a broken or hostile installation would. attack-plan names
the attack of each round: scale (weights x1e6), float64 (every weight 1e300 in float64), count (10^9 images claimed),
flip (weights sign-flipped), slow (an honest reply, 5 s late), none."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as hospital
from common import wire

app = ClientApp()


def _attack(context: Context) -> tuple[Context, int, list[str]]:
    """fedimaging's own context (its run settings only), the attacking hospital and its plan."""
    settings = dict(context.run_config)
    ours = {k: v for k, v in settings.items() if not str(k).startswith("attack-")}
    own = Context(context.run_id, context.node_id, dict(context.node_config), context.state, ours)
    return own, int(settings["attack-hospital"]), str(settings["attack-plan"]).split(",")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The hospital's honest reply, altered where this hospital attacks this round."""
    context, attacker, plan = _attack(context)
    server_round = int(msg.content.config_records["config"]["server-round"])
    reply = hospital.train(msg, context)
    if int(context.node_config["partition-id"]) != attacker or reply.has_error() or server_round > len(plan):
        return reply
    attack, weights = plan[server_round - 1], reply.content[wire.ARRAYS].to_numpy_ndarrays()
    if attack == "scale":
        weights = [w * np.float32(1e6) for w in weights]
    elif attack == "float64":
        weights = [np.full(w.shape, 1e300, np.float64) for w in weights]
    elif attack == "flip":
        weights = [-w for w in weights]
    elif attack == "count":
        reply.content[wire.METRICS][wire.NUM_EXAMPLES] = 10**9
    elif attack == "slow":
        time.sleep(5)
    reply.content[wire.ARRAYS] = ArrayRecord(weights)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The hospital's honest reply."""
    return hospital.evaluate(msg, _attack(context)[0])


@app.query()
def overlap(msg: Message, context: Context) -> Message:
    """The hospital's honest reply."""
    return hospital.overlap(msg, _attack(context)[0])
