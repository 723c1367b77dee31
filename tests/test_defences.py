"""Bounded influence: one hospital of five sends what a broken or hostile one would, through the real strategy and real
Flower messages; each attack meets the defence meant for it, and the hospital is named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message, MessageType, RecordDict

from common import wire
from common.bin_floor import Intervals
from common.config import parse_run_config
from common.metrics import score_histograms
from server import simulate
from server.aggregation import clipped_mean, median, multikrum, trimmed_mean
from server.defences import finite_model, relative_update_norm, score_spread, unusable_scores
from server.influence import leave_one_out
from server.roster import Registered, add_to_roster
from server.strategy import HospitalFedAvg

sys.path.insert(0, str(Path(__file__).resolve().parent / "attack_app"))
from attack_maker import make_attack_app  # noqa: E402 - tests/attack_app/attack_maker.py

SHAPES = [(4, 3), (3,)]
LABELS = ("lesion",)
GLOBAL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), np.array([0.5, -0.5, 1.0], np.float32)]
pytestmark = pytest.mark.usefixtures("task_identity")


def _honest(i: int) -> list[np.ndarray]:
    """Hospital i's update: the global model moved a little, differently per hospital."""
    rng = np.random.default_rng(i)
    return [(g + 0.05 * rng.standard_normal(g.shape)).astype(np.float32) for g in GLOBAL]


def _reply(node_id: int, site: str, weights: list[np.ndarray], n: int = 100) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(wire.pack_train_reply(site, LABELS, weights, n, 0.5), reply_to=request)


def _strategy(roster=None, **settings) -> HospitalFedAvg:
    cfg = parse_run_config({"num-hospitals": 5, "min-hospitals": 2, "histogram-bins": 50, **({"roster": str(roster)} if roster else {}), **settings})
    strategy = HospitalFedAvg(cfg, SHAPES, [True, False])
    strategy.current = [g.copy() for g in GLOBAL]
    return strategy


def _round(strategy: HospitalFedAvg, attacker: list[np.ndarray], n: int = 100) -> list[np.ndarray] | None:
    """Four honest hospitals and hospital-4 sending `attacker` with `n` images; the next global weights (None: kept)."""
    replies = [_reply(i + 1, f"hospital-{i}", _honest(i)) for i in range(4)] + [_reply(5, "hospital-4", attacker, n)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else arrays.to_numpy_ndarrays()


def _honest_mean() -> list[np.ndarray]:
    return [np.mean([_honest(i)[k].astype(np.float64) for i in range(4)], axis=0) for k in range(len(SHAPES))]


def test_a_scaled_update_is_refused_by_its_norm_and_the_hospital_named():
    strategy = _strategy()
    out = _round(strategy, [w * 1e6 for w in _honest(4)])
    assert strategy.record.failures == ["hospital-4 (train): invalid reply: its update is 9.99e+05 times the global model's size, above max-update-norm = 10"]
    assert np.allclose(out[0], _honest_mean()[0], atol=1e-6) and set(strategy.record.trained) == {f"hospital-{i}" for i in range(4)}
    assert all(0 < v < 0.2 for v in strategy.record.update_norms.values())  # the honest ones' sizes, recorded for sites.csv


def test_float64_weights_of_1e300_are_refused_for_their_dtype_before_they_become_inf():
    strategy = _strategy(**{"max-update-norm": 0})
    out = _round(strategy, [np.full(s, 1e300, np.float64) for s in SHAPES])
    assert strategy.record.failures == ["hospital-4 (train): invalid reply: weight array 0 is float64, the global model's is float32"]
    assert np.isfinite(out[0]).all() and out[0].dtype == np.float32


def test_a_claimed_count_is_bounded_by_the_ceiling_and_by_what_the_hospital_declared(tmp_path):
    strategy = _strategy()
    _round(strategy, _honest(4), n=10**9)
    assert strategy.record.failures == ["hospital-4 (train): invalid reply: claims 1000000000 training images, above max-examples = 1000000"]
    roster = tmp_path / "roster.yaml"
    for node, name in enumerate(f"hospital-{i}" for i in range(5)):
        add_to_roster(roster, Registered(name, node + 1, f"key{node}", 120))
    strategy = _strategy(roster)
    out = _round(strategy, _honest(4), n=5000)  # a liar under plain FedAvg would take 5000/5400 of the average
    assert strategy.record.failures == ["hospital-4 (train): invalid reply: claims 5000 training images, more than the 120 it declared in the roster"]
    assert np.allclose(out[0], _honest_mean()[0], atol=1e-6)


@pytest.mark.parametrize("rule", ["clipped-mean", "median", "trimmed-mean", "multikrum"])
@pytest.mark.parametrize("attack", ["scaled x1e6", "sign-flipped"])
def test_each_robust_rule_keeps_one_hostile_hospital_of_five_near_the_honest_mean(rule, attack):
    hostile = [w * 1e6 for w in _honest(4)] if attack == "scaled x1e6" else [-w for w in _honest(4)]
    strategy = _strategy(aggregation=rule, **{"max-update-norm": 0})  # the rule alone, no norm bound
    out = _round(strategy, hostile)
    plain = _round(_strategy(**{"max-update-norm": 0}), hostile)  # what plain FedAvg would have made of it
    gap = relative_update_norm(out, _honest_mean())
    assert gap < 0.1 < relative_update_norm(plain, _honest_mean()), (rule, attack, gap)
    if rule == "multikrum":
        assert strategy.record.left_out_by_rule == ["hospital-4"]


def test_robust_rules_agree_with_their_definitions_on_honest_updates():
    updates, counts = [_honest(i) for i in range(5)], [100, 200, 300, 400, 500]
    stacked = np.stack([u[0].astype(np.float64) for u in updates])
    assert np.allclose(median(updates)[0], np.median(stacked, axis=0))
    ordered = np.sort(stacked, axis=0)
    assert np.allclose(trimmed_mean(updates, 0.2)[0], ordered[1:4].mean(axis=0))  # one of five cut at each end
    kept_mean, kept = multikrum(updates, counts, 0)
    assert kept == [0, 1, 2, 3, 4] and np.allclose(kept_mean[0], np.average(stacked, axis=0, weights=counts))
    norms = [relative_update_norm(u, GLOBAL) for u in updates]
    clipped = clipped_mean(updates, counts, GLOBAL)
    assert relative_update_norm(clipped, GLOBAL) <= np.median(norms) + 1e-9  # no further than a typical hospital


def test_an_aggregate_that_is_not_finite_is_named_and_never_becomes_the_model():
    assert finite_model([np.full(3, 1e39)], [np.dtype(np.float32)]) == "the aggregate's weight array 0 is not finite in float32"
    assert finite_model([np.full(3, np.nan)], [np.dtype(np.float32)]) == "the aggregate's weight array 0 is not finite in float32"
    assert finite_model([np.full(3, 1e38)], [np.dtype(np.float32)]) == ""
    # a global model close to float32's largest value: the hospitals' updates are each valid, their FedAdam step is not
    strategy = _strategy(aggregation="fedadam", **{"max-update-norm": 0, "server-learning-rate": 1e38})
    strategy.current = [np.full(s, 3.3e38, np.float32) for s in SHAPES]
    replies = [_reply(i + 1, f"hospital-{i}", [np.full(s, 3.4e38, np.float32) for s in SHAPES]) for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and set(strategy.record.trained) == {"hospital-0", "hospital-1"}  # the run goes on with the old model
    assert strategy.record.unavailable["global_model"] == "fedadam: the aggregate's weight array 0 is not finite in float32; the previous model is kept"
    assert strategy.record.failures == [] and "previous model was kept" in strategy.record.unavailable["global_auc"]


def test_a_global_model_whose_scores_are_not_finite_or_have_collapsed_is_named_and_a_fresh_one_is_not():
    rng = np.random.default_rng(0)
    current = rng.normal(size=(50, 2))  # a model that tells images apart, two labels
    assert unusable_scores(current, score_spread(current)) == ""
    broken = current.copy()
    broken[3, 1] = np.nan
    assert unusable_scores(broken, score_spread(current)) == "its scores of 1 of 50 held-out images are not finite"
    collapsed = current.copy()
    collapsed[:, 1] = 7.25  # every image the same score for the second label
    assert unusable_scores(collapsed, score_spread(current)).startswith("it has collapsed: it gives every held-out image the same probability")
    saturated = current + 1e4  # scores that differ, probabilities that do not: 1.0 for everyone
    assert unusable_scores(saturated, score_spread(current)).startswith("it has collapsed")
    assert unusable_scores(collapsed, 0.0) == ""  # a model that never told them apart (a fresh start) has nothing to lose


def test_a_validation_count_above_the_declared_size_is_refused(tmp_path):
    roster = tmp_path / "roster.yaml"
    add_to_roster(roster, Registered("hospital-0", 1, "k0", 50))
    strategy = _strategy(roster)
    request = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    strategy.aggregate_evaluate(1, [Message(_evaluate_content(2_000_000), reply_to=request)])
    assert strategy.record.failures == ["hospital-0 (evaluate): invalid reply: claims 2000000 validation images, more than the 50 it declared in the roster"]


def _evaluate_content(n: int) -> RecordDict:
    """hospital-0's evaluate reply: n validation images, half of them positive, in one interval."""
    whole = Intervals(np.array([0]), np.array([n // 2]), np.array([n - n // 2]))
    return wire.pack_evaluate_reply("hospital-0", LABELS, n, [whole])



def _site(name: str, logits_pos: np.ndarray, logits_neg: np.ndarray, n_bins: int = 50) -> wire.EvaluateReply:
    """A site's evaluate reply with every bin its own interval (floor 1), from its patients' logits."""
    logits = np.concatenate([logits_pos, logits_neg])[:, None]
    labels = np.concatenate([np.ones(len(logits_pos)), np.zeros(len(logits_neg))])[:, None]
    pos, neg = score_histograms(logits, labels, n_bins)
    return wire.EvaluateReply(name, len(logits), [Intervals(np.arange(n_bins), pos[0], neg[0])])


def test_leaving_each_site_out_names_a_site_whose_fabricated_histograms_move_the_pooled_figures():
    cfg = parse_run_config({"histogram-bins": 50, "min-bin-images": 1})
    rng = np.random.default_rng(0)
    honest = [_site(f"hospital-{i}", rng.normal(1.5, 1.5, 60), rng.normal(-1.5, 1.5, 60)) for i in range(4)]
    row, warnings = leave_one_out(honest, cfg)
    assert warnings == [] and row["loo_auc_shift"] < 0.05 and row["loo_sensitivity_shift"] < 0.05
    # 200 000 fabricated patients, perfectly separated: the pooled AUC goes to 1
    perfect = _site("hospital-4", np.full(100_000, 12.0), np.full(100_000, -12.0))
    row, warnings = leave_one_out([*honest, perfect], cfg)
    assert row["loo_site"] == "hospital-4" and row["loo_auc_shift"] > 0.05
    assert any(w.startswith("hospital-4 moves the pooled lesion AUC from 0.9") for w in warnings), warnings
    # positives fabricated at a high score only: the operating point climbs to where the others' patients are missed
    dragging = _site("hospital-4", np.full(100_000, 9.0), rng.normal(-1.5, 1.5, 60))
    row, warnings = leave_one_out([*honest, dragging], cfg)
    assert row["loo_site"] == "hospital-4" and row["loo_sensitivity_shift"] > 0.5
    assert any(w.startswith("hospital-4 moves the operating point: the other sites' lesion sensitivity there is 0.") for w in warnings), warnings
    assert all(w.startswith("hospital-4") for w in warnings)  # the honest sites are not named
    row, warnings = leave_one_out(honest[:2], cfg)  # of two, without one is the other's own figures: not computed
    assert np.isnan(row["loo_auc_shift"]) and row["loo_site"] == "" and warnings == []


def test_one_hospital_of_five_attacking_each_round_is_named_and_the_federation_still_learns(tmp_path, own_flower_processes):
    """Real Flower simulation, plain FedAvg with the default bounds: hospital-4 sends its weights x1e6, then float64
    1e300, then claims 10^9 images, then trains honestly. Each attack is refused and named, the run finishes, and the
    federation learns (this configuration's clean run reached a held-out AUC of 0.88 in 8 rounds in the last benchmark)."""
    app = make_attack_app(tmp_path / "app")
    settings = {"num-hospitals": 5, "images-per-hospital": 300, "heldout-images": 200, "image-size": 32, "num-server-rounds": 8,
                "local-epochs": 3, "gradcam-images": 0, "output-dir": str(tmp_path / "runs"), "run-name": "attacked", "min-hospitals": 3}  # fmt: skip
    folder = simulate.simulate(simulate.prepare(settings), app, {"attack-hospital": 4, "attack-plan": "scale,float64,count"})
    assert not own_flower_processes()
    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == list(range(9))
    failures = history["failures"].fillna("").tolist()[1:]
    assert failures[0].startswith("hospital-4 (train): invalid reply: its update is") and "above max-update-norm = 10" in failures[0]
    assert failures[1] == "hospital-4 (train): invalid reply: weight array 0 is float64, the global model's is float32"
    assert failures[2] == "hospital-4 (train): invalid reply: claims 1000000000 training images, above max-examples = 1000000"
    assert failures[3:] == [""] * 5 and history["n_sites"].tolist()[1:] == [4, 4, 4, 5, 5, 5, 5, 5]
    assert history["heldout_auc"].iloc[-1] >= 0.8, history["heldout_auc"].tolist()
    sites = pd.read_csv(folder / "sites.csv")
    assert sites["update_norm"].dropna().between(0, 10).all() and len(sites) == 5 * 8  # the honest updates' sizes, each round
