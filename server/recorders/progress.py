"""The operator's progress lines (streamed by `flwr run --stream`): round k of n with the figures that matter, each
failure and warning in one line, what could not be computed and why, the time left, and how the run ended."""

from __future__ import annotations

import math

from server.console import say
from server.rounds import Outcome, Recorder, RoundReport, RunInfo

RANDOMISED_LIMIT = 0.5  # |Spearman| of the fully randomised stage below which the heatmaps depend on the weights


def fmt(value, digits: int = 3) -> str:
    """A figure for the progress line: '-' where undefined."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def clock(seconds: float) -> str:
    """Seconds as '1m30s'."""
    whole = int(round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s"


def sanity_verdict(label: str, rho: float) -> str:
    """The randomisation test's verdict on a label, judged by the size of the fully randomised stage's correlation."""
    verdict = (
        f"|rho| {abs(rho):.2f} < {RANDOMISED_LIMIT}: the heatmaps depend on the learnt weights"
        if abs(rho) < RANDOMISED_LIMIT
        else f"WARNING: |rho| {abs(rho):.2f} >= {RANDOMISED_LIMIT}: the heatmaps barely depend on the weights (they explain little)"
    )
    return f"Grad-CAM randomisation test ({label}): the fully randomised model's heatmaps correlate {rho:+.2f} with the trained model's; {verdict}"


class ProgressRecorder(Recorder):
    """Prints the run's progress."""

    def start(self, run: RunInfo) -> None:
        """Where the run writes, and where a resumed run goes on from."""
        say(f"run folder: {run.folder}")
        if run.resumed is not None:
            say(f"resuming after round {run.resumed} from {run.folder / 'checkpoint.npz'}")

    def record(self, report: RoundReport) -> None:
        """The round's line, then one line per failure, warning and missing figure."""
        n, row, cfg = report.cfg.num_server_rounds, report.row(), report.cfg
        for note in report.notes:
            say(note)
        held = f"held-out AUC {fmt(row.get('heldout_auc'))}"
        if report.round == 0:
            say(f"round 0/{n}  {held} (initial model, {int(row.get('heldout_n', 0))} held-out images)")
        else:
            auc = f"pooled AUC {fmt(row.get('global_auc'))}"
            low, high = row.get("global_auc_low", math.nan), row.get("global_auc_high", math.nan)
            if high - low > 0.02:
                auc += f" (bins allow {fmt(low)}-{fmt(high)})"
            border = row.get("gradcam_border_energy", math.nan)
            say(
                f"round {report.round}/{n}  {auc}  sens {fmt(row.get('global_sensitivity'), 2)}  spec {fmt(row.get('global_specificity'), 2)}"
                f"  worst site AUC {fmt(row.get('worst_site_auc'))} ({row.get('worst_site') or '-'})  {held}"
                f"  sites {row['n_sites']}/{report.record.asked}  pointing {fmt(row.get('gradcam_pointing'), 2)}"
                f"  border {fmt(border, 2)}/{cfg.gradcam_border_threshold:g}"
                + (f"  FAILED {row['n_failed']}" if row["n_failed"] else "")
                + f"  {report.seconds:.1f} s  ETA {clock(report.eta_seconds)}"
            )
        if report.record.privacy:
            privacy = report.record.privacy
            say(f"  privacy ({cfg.dp} DP): epsilon {privacy['dp_epsilon']:.2f} spent so far at delta {privacy['dp_delta']:g}")
        for failure in report.record.failures:
            say(f"  failed: {failure}")
        for late in report.record.late:
            say(f"  late: {late}")
        if report.record.left_out_by_rule:
            say(f"  not averaged by {cfg.aggregation} (furthest from the others): {', '.join(report.record.left_out_by_rule)}")
        for name, why in report.unavailable().items():
            say(f"  not available: {name}: {why}")
        for warning in report.record.influence:
            say(f"INFLUENCE WARNING round {report.round}: {warning}")
        for warning in report.warnings:
            say(f"GRAD-CAM WARNING round {report.round}: {warning}")

    def finish(self, outcome: Outcome) -> None:
        """The randomisation test's verdict, and how the run ended."""
        for label in dict.fromkeys(label for label, _, _ in outcome.sanity):
            say(sanity_verdict(label, [rho for l, _, rho in outcome.sanity if l == label][-1]))
        final = outcome.final
        best = f"best model: round {outcome.best_round} by {outcome.best.describe()}" if outcome.best is not None else "no best model (nothing trained)"
        ci = f"{fmt(final.get('heldout_auc_ci_low'))}-{fmt(final.get('heldout_auc_ci_high'))}"
        say(f"{'done' if outcome.status == 'finished' else 'FAILED'}: {outcome.reason}; {best}; final held-out AUC {fmt(final.get('heldout_auc'))} (95 % CI {ci})")
