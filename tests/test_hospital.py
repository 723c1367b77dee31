"""The hospital's own answers (client/hospital.py, what its worker runs): its policy, written in its site file, is
enforced before any work; a refusal is one line, is in the audit log, and reaches the server's history as that
hospital's failure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.hospital import answer
from common import wire
from common.audit import read_audit
from common.config import config_to_dict, parse_run_config
from common.demo_sites import write_demo_sites
from common.model import build_model
from server import simulate


def _site_with_policy(tmp_path, policy: str, images: int = 40):
    """Hospital 1 of a small demo run written to disk, its site file given the policy (YAML lines under 'policy:')."""
    cfg = parse_run_config({"num-hospitals": 2, "images-per-hospital": images, "heldout-images": 20, "image-size": 32})
    *site_files, heldout = write_demo_sites(cfg, tmp_path / "sites")
    path = site_files[1]
    path.write_text(path.read_text() + "policy:\n" + "".join(f"  {line}\n" for line in policy.splitlines()))
    return cfg, path, site_files, heldout


def _ask(kind: str, cfg, path, round_: int = 1, **settings):
    """What the hospital answers to one request of the run cfg (with settings changed), as its worker asks it."""
    run_config = config_to_dict(cfg) | settings
    weights = build_model(cfg.model, (32, 32, 1), 1, cfg.learning_rate).get_weights()
    return answer(kind, run_config, {"site-config": str(path)}, weights, {"run_id": 1, "server_round": round_})


def test_a_run_setting_the_hospital_does_not_accept_is_refused_in_one_line_and_audited(tmp_path):
    cfg, path, *_ = _site_with_policy(tmp_path, "run-settings: {aggregation: [fedavg], local-epochs: [1, 2]}")
    ok, said = _ask("train", cfg, path, aggregation="fedadam")
    assert not ok and said == "[site hospital-1] PolicyError: run setting 'aggregation' = 'fedadam' is not accepted by this hospital (accepted: 'fedavg')"
    ok, said = _ask("score", cfg, path, **{"local-epochs": 3})
    assert not ok and "run setting 'local-epochs' = 3 is not accepted" in said
    ok, reply = _ask("train", cfg, path, aggregation="fedavg", **{"local-epochs": 1})
    assert ok and reply[wire.METRICS][wire.NUM_EXAMPLES] > 0
    entries = read_audit(path.parent / "reports" / "hospital-1")
    assert [("error" in e, e["type"]) for e in entries] == [(True, "train"), (True, "evaluate"), (False, "train")]
    assert entries[0]["error"] == "[site hospital-1] PolicyError: run setting 'aggregation' = 'fedadam' is not accepted by this hospital (accepted: 'fedavg')"
    assert "arrays" not in entries[0]  # a refusal carries its line of error, nothing else


def test_the_hospital_trains_no_more_rounds_a_day_than_its_policy_allows(tmp_path):
    cfg, path, *_ = _site_with_policy(tmp_path, "max-rounds-per-day: 2")
    answers = [_ask("train", cfg, path, round_)[0] for round_ in (1, 2, 3)]
    assert answers == [True, True, False]
    ok, said = _ask("train", cfg, path, 4)
    assert said == "[site hospital-1] PolicyError: 2 training rounds answered in the last 24 hours: this hospital's policy allows 2"
    assert _ask("score", cfg, path, 4)[0]  # validation is not training: still answered


def test_the_hospitals_own_histogram_floor_applies_where_it_is_higher_than_the_runs(tmp_path):
    cfg, path, *_ = _site_with_policy(tmp_path, "min-bin-images: 1000", images=80)
    ok, reply = _ask("score", cfg, path, **{"min-bin-images": 1})  # the run would take every bin as it is
    metrics = reply[wire.METRICS]
    assert ok and metrics[wire.HIST_INTERVALS] == [1] and metrics[wire.HIST_STARTS] == [0]  # all validation images in one interval
    assert metrics[wire.HIST_POS][0] + metrics[wire.HIST_NEG][0] == metrics[wire.NUM_EXAMPLES]


@pytest.mark.parametrize("policy, error", [
    ("max-rounds-per-day: -1", "'policy.max-rounds-per-day': -1 is out of range"),
    ("run-settings: [fedavg]", "'policy.run-settings': expected a mapping from run settings to lists of accepted values"),
    ("rounds: 3", "'policy': unknown key(s) rounds"),
])  # fmt: skip
def test_a_broken_policy_is_refused_naming_the_site_file_and_key(tmp_path, policy, error):
    from common.errors import ConfigError
    from common.site_file import load_site_config

    _, path, *_ = _site_with_policy(tmp_path, policy)
    with pytest.raises(ConfigError, match=str(path)) as caught:
        load_site_config(path)
    assert error in str(caught.value)


def test_a_policy_naming_a_run_setting_that_does_not_exist_stops_the_hospital_at_start(tmp_path, capsys):
    from client import supernode

    _, path, *_ = _site_with_policy(tmp_path, "run-settings: {strategy: [fedavg]}")
    assert supernode.main(["--site", str(path), "--superlink", "127.0.0.1:1", "--insecure", "--unisolated"]) == 2
    assert "'policy.run-settings' names unknown run setting(s) 'strategy'; known settings: aggregation," in capsys.readouterr().err


def test_a_refusal_reaches_the_servers_history_as_that_hospitals_failure(tmp_path, own_flower_processes):
    cfg, path, site_files, heldout = _site_with_policy(tmp_path, "run-settings: {aggregation: [fedadam]}")
    settings = (
        f"sites='{site_files[0]},{site_files[1]}' heldout-site='{heldout}' num-server-rounds=1 image-size=32 min-hospitals=1 "
        f"aggregation='fedavg' output-dir='{tmp_path / 'runs'}' run-name='refused'"
    )
    assert simulate.main(["-c", settings]) == 0
    assert not own_flower_processes()
    history = pd.read_csv(tmp_path / "runs" / "refused" / "history.csv")
    assert history.loc[1, "n_sites"] == 1 and history.loc[1, "n_failed"] >= 1
    refusal = "hospital-1 (train): client error: PolicyError: run setting 'aggregation' = 'fedavg' is not accepted by this hospital (accepted: 'fedadam')"
    assert refusal in history.loc[1, "failures"]


def test_with_a_cosine_schedule_a_hospitals_last_round_moves_the_model_a_tenth_as_far_as_its_first(tmp_path):
    cfg, path, *_ = _site_with_policy(tmp_path, "max-rounds-per-day: 100")
    settings = {"learning-rate-schedule": "cosine", "num-server-rounds": 5, "local-epochs": 1, "deterministic": True}
    model = build_model(cfg.model, (32, 32, 1), 1, cfg.learning_rate)
    weights, learnt = model.get_weights(), [w.trainable for w in model.weights]  # not the batch statistics: no rate moves them
    moved = []
    for round_ in (1, 5):
        ok, reply = answer("train", config_to_dict(cfg) | settings, {"site-config": str(path)}, weights, {"run_id": 1, "server_round": round_})
        trained = reply[wire.ARRAYS].to_numpy_ndarrays()
        moved.append(np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b, t in zip(trained, weights, learnt) if t)))
    assert ok and 0.05 < moved[1] / moved[0] < 0.2  # Adam's steps scale with the rate: 0.1 x learning-rate in the last round
