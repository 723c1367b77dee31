"""Clipping, noise and privacy accounting agree with hand-computed cases, with Flower's own helpers and with the closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdpAccountant

from common.privacy import add_gaussian_noise, central_stddev, clip_update, epsilon, local_stddev, update_norm

# dp_accounting's DEFAULT_RDP_ORDERS, written out here so that the closed form does not borrow from the code under test
ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], dtype=np.float64)


def _gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of rounds Gaussian releases: RDP rounds * alpha / (2 z^2), converted as in arXiv:2004.00010 Prop. 12."""
    rdp = rounds * ORDERS / (2 * noise_multiplier**2)
    eps = rdp + np.log1p(-1 / ORDERS) - np.log(delta * ORDERS) / (ORDERS - 1)
    return max(0.0, float(eps.min()))


def _flower_epsilon(noise_multiplier: float, rounds: int, sample_size: int, population: int, delta: float) -> float:
    """Flower's own RDP accountant over rounds releases of sample_size hospitals of population (Poisson unless all)."""
    sampling = SamplingMethod.NO_AMPLIFICATION if sample_size == population else SamplingMethod.POISSON
    accountant = FlowerRdpAccountant(PrivacyConfig(delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE, sampling))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sample_size, population), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "weights, reference, clip_norm, expected, norm",
    [
        ([[4.0, 5.0]], [[1.0, 1.0]], 1.0, [[1.6, 1.8]], 5.0),  # update (3, 4): norm 5 scaled to 1 -> (0.6, 0.8)
        ([[3.0], [4.0]], [[0.0], [0.0]], 1.0, [[0.6], [0.8]], 5.0),  # the norm is taken over all arrays together
        ([[4.0, 5.0]], [[1.0, 1.0]], 5.0, [[4.0, 5.0]], 5.0),  # exactly at the bound: unchanged
        ([[1.3, 0.6]], [[1.0, 1.0]], 1.0, [[1.3, 0.6]], 0.5),  # under the bound: unchanged
        ([[2.0, 2.0]], [[2.0, 2.0]], 1.0, [[2.0, 2.0]], 0.0),  # no update at all: unchanged
    ],
)
def test_clip_update_hand_computed(weights, reference, clip_norm, expected, norm):
    weights, reference = [np.array(w) for w in weights], [np.array(r) for r in reference]
    clipped, before = clip_update(weights, reference, clip_norm)
    assert before == pytest.approx(norm)
    for got, want in zip(clipped, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert update_norm(clipped, reference) <= clip_norm + 1e-12


def test_clip_update_keeps_dtype_and_matches_flower():
    rng = np.random.default_rng(0)
    reference = [rng.normal(size=(3, 3, 1, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)]
    weights = [r + rng.normal(0, 0.5, r.shape).astype(np.float32) for r in reference]
    clipped, before = clip_update(weights, reference, 0.7)
    assert [c.dtype for c in clipped] == [np.float32, np.float32]
    assert [c.shape for c in clipped] == [w.shape for w in weights]
    assert before == pytest.approx(update_norm(weights, reference)) and before > 0.7
    assert update_norm(clipped, reference) == pytest.approx(0.7, rel=1e-5)
    flower = [w.astype(np.float64) for w in weights]
    compute_clip_model_update(flower, [r.astype(np.float64) for r in reference], 0.7)
    for ours, theirs in zip(clipped, flower, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_clip_update_rejects_a_non_positive_bound():
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update([np.ones(2)], [np.zeros(2)], 0.0)


def test_noise_has_the_asked_spread_and_keeps_dtype():
    weights = [np.full((400, 250), 2.0, np.float32), np.full(100_000, -1.0, np.float32)]
    noised = add_gaussian_noise(weights, 0.3, np.random.default_rng(1))
    assert [n.dtype for n in noised] == [np.float32, np.float32] and [n.shape for n in noised] == [w.shape for w in weights]
    noise = np.concatenate([(n.astype(np.float64) - w).ravel() for n, w in zip(noised, weights, strict=True)])
    assert noise.std() == pytest.approx(0.3, rel=0.02)
    assert abs(noise.mean()) < 4 * 0.3 / math.sqrt(noise.size)
    np.testing.assert_array_equal(weights[0], 2.0)  # the input is left alone


def test_noise_is_reproducible_with_a_seeded_generator():
    weights = [np.zeros((5, 5)), np.zeros(7)]
    first, again = (add_gaussian_noise(weights, 1.0, np.random.default_rng(7)) for _ in range(2))
    other = add_gaussian_noise(weights, 1.0, np.random.default_rng(8))
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    np.testing.assert_array_equal(add_gaussian_noise(weights, 0.0, np.random.default_rng(7))[1], weights[1])


@pytest.mark.parametrize("noise_multiplier, clip_norm, n_sites", [(1.0, 1.0, 4), (0.8, 2.5, 7), (0.0, 1.0, 3)])
def test_central_stddev_is_flowers(noise_multiplier, clip_norm, n_sites):
    assert central_stddev(noise_multiplier, clip_norm, n_sites) == pytest.approx(compute_stdv(noise_multiplier, clip_norm, n_sites))
    assert local_stddev(noise_multiplier, clip_norm) == pytest.approx(noise_multiplier * clip_norm)


@pytest.mark.parametrize("noise_multiplier, rounds, delta", [(0.5, 10, 1e-5), (1.0, 10, 1e-5), (1.0, 20, 1e-5), (2.0, 1, 1e-3), (5.0, 100, 1e-6)])
def test_epsilon_with_every_hospital_each_round_is_the_closed_form(noise_multiplier, rounds, delta):
    eps = epsilon(noise_multiplier, [1.0] * rounds, delta)
    assert eps == pytest.approx(_gaussian_epsilon(noise_multiplier, rounds, delta), rel=1e-6)
    assert eps == pytest.approx(_flower_epsilon(noise_multiplier, rounds, 4, 4, delta), rel=1e-9)


def test_epsilon_with_sampled_hospitals_is_flowers_poisson_account():
    assert epsilon(1.0, [0.25] * 10, 1e-5) == pytest.approx(_flower_epsilon(1.0, 10, 1, 4, 1e-5), rel=1e-9)


def test_epsilon_moves_the_right_way():
    base = epsilon(1.0, [1.0] * 10, 1e-5)
    assert epsilon(1.0, [1.0] * 20, 1e-5) > base  # more rounds
    assert epsilon(2.0, [1.0] * 10, 1e-5) < base  # more noise
    assert epsilon(1.0, [0.25] * 10, 1e-5) < epsilon(1.0, [0.5] * 10, 1e-5) < base  # fewer hospitals a round
    assert epsilon(1.0, [1.0] * 10, 1e-3) < base  # a looser delta
    mixed = epsilon(1.0, [1.0, 0.5, 1.0, 0.5], 1e-5)
    assert mixed == pytest.approx(epsilon(1.0, [0.5, 0.5, 1.0, 1.0], 1e-5))  # the order of rounds does not matter
    assert epsilon(1.0, [0.5] * 4, 1e-5) < mixed < epsilon(1.0, [1.0] * 4, 1e-5)


def test_epsilon_edge_cases():
    assert epsilon(0.0, [1.0], 1e-5) == math.inf
    assert epsilon(0.0, [], 1e-5) == 0.0 and epsilon(1.0, [], 1e-5) == 0.0
    for bad in [(-1.0, [1.0], 1e-5), (1.0, [1.5], 1e-5), (1.0, [1.0], 0.0), (1.0, [1.0], 1.0)]:
        with pytest.raises(ValueError):
            epsilon(*bad)


# The hospital's clipping and noise (client/training.py), the server's checks, noise and accountant (server/privacy.py),
# and a real simulation of each option.

SHAPES = [(40, 30), (30,), (30,)]  # the last stands for batch-normalisation variances


def _dp(mode: str, z: float = 1.0, clip: float = 1.0):
    from common.config import parse_run_config

    return parse_run_config({"dp": mode, "dp-noise-multiplier": z, "dp-clip-norm": clip, "dp-delta": 1e-5, "histogram-bins": 50})


def test_a_hospital_clips_its_update_and_under_local_dp_noises_it_before_it_leaves():
    from client.training import private

    rng = np.random.default_rng(0)
    received = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    trained = [w + np.float32(0.5) for w in received]  # an update of norm 0.5 x sqrt(1260) = 17.7
    assert private(_dp("off"), trained, received) is trained
    central = private(_dp("central", clip=2.0), trained, received)
    assert update_norm(central, received) == pytest.approx(2.0, rel=1e-5) and all(w.dtype == np.float32 for w in central)
    local = private(_dp("local", z=1.0, clip=2.0), trained, received)
    noise = np.concatenate([(a - b).ravel() for a, b in zip(local, central)])
    assert noise.std() == pytest.approx(2.0, rel=0.1)  # sd = z x clip on every coordinate
    again = private(_dp("local", z=1.0, clip=2.0), trained, received)
    assert not np.allclose(again[0], local[0])  # fresh noise each time: nobody can subtract it


def _strategy(cfg):
    from server.strategy import HospitalFedAvg

    strategy = HospitalFedAvg(cfg, SHAPES, [True, True, False], [False, False, True])
    strategy.current = [np.zeros(s, np.float32) for s in SHAPES]
    return strategy


def _reply(site: str, weights):
    from flwr.app import Message, MessageType, RecordDict

    from common import wire

    request = Message(content=RecordDict(), dst_node_id=int(site[-1]) + 1, message_type=MessageType.TRAIN)
    return Message(wire.pack_train_reply(site, ("lesion",), weights, 100, 0.5), reply_to=request)


@pytest.mark.usefixtures("task_identity")
def test_the_server_refuses_an_unclipped_update_adds_noise_to_the_mean_and_counts_the_budget():
    cfg = _dp("central", z=1.0, clip=1.0)
    strategy = _strategy(cfg)
    clipped = [[np.full(s, v / math.sqrt(1260), np.float32) for s in SHAPES] for v in (1.0, -1.0, 0.5)]  # norms 1, 1, 0.5
    unclipped = [np.full(s, 0.1, np.float32) for s in SHAPES]  # norm 3.5
    replies = [_reply(f"site{i}", w) for i, w in enumerate(clipped)] + [_reply("site3", unclipped)]
    strategy.record.asked, strategy.dp_rounds = 4, 1  # as configure_train leaves them when it asks four hospitals
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.record.failures == ["site3 (train): invalid reply: its update's norm 3.55 is above 1.001, what dp = central with dp-clip-norm = 1 allows: the hospital did not clip"]
    mean = np.mean([w[0] for w in clipped], axis=0)
    noise = arrays.to_numpy_ndarrays()[0] - mean
    assert noise.std() == pytest.approx(1.0 * 1.0 / 3, rel=0.1)  # z x clip / n, n = 3 updates counted
    assert (arrays.to_numpy_ndarrays()[2] >= 1e-3).all()  # a variance never goes below zero
    assert strategy.record.privacy["dp_epsilon"] == pytest.approx(epsilon(1.0, [1.0], 1e-5))
    assert strategy.record.privacy["dp_epsilon_replace_one"] == pytest.approx(epsilon(0.5, [1.0], 1e-5))  # twice the sensitivity
    assert math.isnan(strategy.record.train_loss)  # withheld under DP
    strategy.record.asked, strategy.dp_rounds = 3, 2  # a second round asked for (configure_train counts it)
    strategy.aggregate_train(2, replies[:3])
    assert strategy.record.privacy["dp_epsilon"] == pytest.approx(epsilon(1.0, [1.0, 1.0], 1e-5))  # the budget adds up


@pytest.mark.usefixtures("task_identity")
def test_local_dp_counts_each_hospital_once_and_refuses_an_update_beyond_clip_and_noise():
    cfg = _dp("local", z=0.01, clip=1.0)
    strategy = _strategy(cfg)
    small = [np.full(s, 0.01, np.float32) for s in SHAPES]  # norm 0.35: within clipping
    other = [np.full(s, 0.02, np.float32) for s in SHAPES]
    huge = [np.full(s, 1.0, np.float32) for s in SHAPES]  # norm 35.5, beyond 1.001 + 0.01 x (sqrt(1260) + 4) = 1.396
    replies = [_reply("site0", small), _reply("site1", other), _reply("site2", huge)]
    replies[1].content["metrics"]["num-examples"] = 100_000  # a claim that would carry an image-weighted mean
    strategy.record.asked = 3
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.record.failures[0].startswith("site2 (train): invalid reply: its update's norm 35.5 is above 1.396, what dp = local")
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 0.015)  # the plain mean of the two, not weighted by the claim


def test_central_dp_refuses_a_robust_rule_it_was_not_sized_for():
    from common.config import parse_run_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="'dp' = 'central' adds noise sized for the mean"):
        parse_run_config({"dp": "central", "aggregation": "median"})


def test_a_simulation_with_local_dp_records_its_budget_each_round(tmp_path, own_flower_processes):
    # Central DP runs through a real simulation in tests/test_benchmarks.py (the privacy benchmark, noise 1.0).
    mode, z = "local", 0.5
    import pandas as pd

    from server import simulate

    settings = {"num-server-rounds": 2, "num-hospitals": 2, "images-per-hospital": 60, "heldout-images": 30, "image-size": 32,
                "min-bin-images": 2, "gradcam-images": 0, "dp": mode, "dp-noise-multiplier": z, "dp-clip-norm": 0.1,
                "output-dir": str(tmp_path), "run-name": mode}  # fmt: skip  (noise small enough that the model is not kept out as collapsed)
    folder = simulate.simulate(simulate.prepare(settings))
    history = pd.read_csv(folder / "history.csv")
    assert history["n_rejected"].tolist() == [0, 0, 0] and history["n_sites"].tolist()[1:] == [2, 2]  # both hospitals clipped
    assert history["dp_epsilon"].iloc[1:].tolist() == pytest.approx([epsilon(z, [1.0] * k, 1e-5) for k in (1, 2)], rel=1e-4)
    assert json.loads((folder / "config.json").read_text())["dp"] == mode
    assert not own_flower_processes()
