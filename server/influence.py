"""How much one hospital moves the pooled figures: each round, the pooled validation AUC and operating point without
each site in turn (leave-one-site-out, from the same intervals the pooled figures come from), and a warning naming the
site where leaving it out moves the AUC by more than `max-site-auc-shift`, or the other sites' sensitivity at the
operating point by more than `max-site-sensitivity-shift`.

A site whose histograms are fabricated (self-consistent, and within the image counts the bounds allow) can set the
pooled AUC or drag the operating point to a threshold where the other hospitals' patients are missed; the warning is
how the people reading the run see it. The operating point's move is measured where it matters: the other sites'
pooled sensitivity at the threshold chosen with the site, against at the one chosen without it.
"""

from __future__ import annotations

import math

import numpy as np

from common import wire
from common.bin_floor import pooled
from common.config import RunConfig
from common.metrics import auc_from_histograms, edge_for_sensitivity, rates_at_edge


def _figures(replies: list[wire.EvaluateReply], j: int, n_bins: int, target: float) -> tuple[np.ndarray, np.ndarray, float, int | None]:
    """Label j's pooled histograms of these sites, their AUC and the bin edge reaching the target sensitivity."""
    pos, neg = pooled([r.intervals[j] for r in replies], n_bins)
    return pos, neg, auc_from_histograms(pos, neg), edge_for_sensitivity(pos, target)


def leave_one_out(replies: list[wire.EvaluateReply], cfg: RunConfig) -> tuple[dict[str, float | str], list[str]]:
    """The largest move of the pooled AUC and of the others' sensitivity at the operating point that leaving one site out
    makes, the site that makes it (history.csv columns), and a warning per move above its bound. Needs three
    sites or more: without one of two, what is left is a single hospital's own figures."""
    if len(replies) < 3:
        return {"loo_auc_shift": math.nan, "loo_sensitivity_shift": math.nan, "loo_site": ""}, []
    n_bins, target = cfg.histogram_bins, cfg.target_sensitivity
    everyone = [_figures(replies, j, n_bins, target) for j in range(len(cfg.labels))]
    auc_moves, sens_moves, warnings = {}, {}, []
    for i, site in enumerate(r.site for r in replies):
        others = replies[:i] + replies[i + 1 :]
        auc_moves[site] = sens_moves[site] = 0.0
        for j, label in enumerate(cfg.labels):
            _, _, auc_all, edge_all = everyone[j]
            pos, neg, auc_rest, edge_rest = _figures(others, j, n_bins, target)
            if not (math.isnan(auc_all) or math.isnan(auc_rest)):
                auc_moves[site] = max(auc_moves[site], abs(auc_all - auc_rest))
                if cfg.max_site_auc_shift and abs(auc_all - auc_rest) > cfg.max_site_auc_shift:
                    warnings.append(f"{site} moves the pooled {label} AUC from {auc_rest:.3f} (without it) to {auc_all:.3f}")
            if edge_all is not None and edge_rest is not None:
                at_all, at_rest = rates_at_edge(pos, neg, edge_all)[0], rates_at_edge(pos, neg, edge_rest)[0]
                sens_moves[site] = max(sens_moves[site], abs(at_all - at_rest))
                if cfg.max_site_sensitivity_shift and abs(at_all - at_rest) > cfg.max_site_sensitivity_shift:
                    warnings.append(f"{site} moves the operating point: the other sites' {label} sensitivity there is {at_all:.2f} with it, {at_rest:.2f} without it")
    top = max(auc_moves, key=lambda s: max(auc_moves[s], sens_moves[s]))
    return {"loo_auc_shift": max(auc_moves.values()), "loo_sensitivity_shift": max(sens_moves.values()), "loo_site": top}, warnings
