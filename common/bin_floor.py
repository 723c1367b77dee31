"""The histogram floor: what a hospital may say about its validation scores, and how the server pools what it said.

The rule, applied at the hospital (client/training.py, in its own process or long-lived worker):

    Every score interval a hospital reports holds no image or at least k of its validation images (k =
    min-bin-images), and its boundaries are cut points fixed by the run's bins, never placed at an image's score.
    Nothing else about its scores leaves: not an individual score, not a count of fewer than k images in any interval,
    not the confusion counts (they follow from the intervals beside the threshold). Only the numbers of positives and
    negatives are sent as they are (a hospital with fewer than 2k images therefore sends one interval over every bin,
    which says no more than those numbers).

A hospital starts from one interval over every bin and cuts an interval in two only where each part holds no image
or at least k images, trying the cut points in a fixed order (the run's threshold first, then the interval's half,
quarters and eighths), and cuts each part again the same way. A large site's intervals end as the run's fine bins
where its scores crowd, a small site's as a few wide ones. Adjacent empty intervals are merged (that says nothing
more). That a cut was not made says that one part would have held between 1 and k - 1 images; no count below k is
ever sent.

The server keeps each site's intervals apart: it checks them against the images the site validated on, can leave any
site out of a sum, and pools them by the self-consistency estimate for interval-censored counts (Turnbull 1976):
an interval's images are spread over its bins in proportion to where the other sites' images of the same class lie
in it (uniformly where nobody says more). The pooled AUC is an estimate; `auc_bounds` gives the interval that every
arrangement of the images inside their intervals allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EM_ITERATIONS = 200
EM_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Intervals:
    """One label's validation scores at one site, as the floor lets them out: counts of positives and negatives per
    score interval; interval i covers bins starts[i] to starts[i + 1] - 1 (the last one to the run's last bin)."""

    starts: np.ndarray  # (g,) int64, ascending, starts[0] == 0
    pos: np.ndarray  # (g,) int64
    neg: np.ndarray  # (g,) int64

    def ends(self, n_bins: int) -> np.ndarray:
        """(g,) one past each interval's last bin."""
        return np.append(self.starts[1:], n_bins)

    def spread(self, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_bins,) float positives and negatives, each interval's count spread evenly over its bins."""
        widths = np.diff(np.append(self.starts, n_bins))
        which = np.repeat(np.arange(len(self.starts)), widths)  # (n_bins,) the interval of each bin
        return self.pos[which] / widths[which], self.neg[which] / widths[which]

    def splits_at(self, b: int) -> bool:
        """True when the counts below and from bin b are known exactly: no non-empty interval straddles b."""
        i = int(np.searchsorted(self.starts, b, side="right")) - 1  # the interval holding bin b
        return bool(self.starts[i] == b or self.pos[i] + self.neg[i] == 0)

    @property
    def informative(self) -> bool:
        """True when some positive and some negative lie in different intervals (the ranking says something)."""
        return bool(((self.pos > 0).any() and (self.neg > 0).any()) and len(np.flatnonzero((self.pos + self.neg) > 0)) > 1)


SPLITS = (1 / 2, 1 / 4, 3 / 4, 1 / 8, 3 / 8, 5 / 8, 7 / 8)  # where an interval may be cut, in the order they are tried


def candidates(lo: int, hi: int) -> list[int]:
    """The bins at which the interval [lo, hi) may be cut, in the order they are tried: fixed by the interval alone."""
    return list(dict.fromkeys(b for b in (lo + round((hi - lo) * f) for f in SPLITS) if lo < b < hi))


def floor_intervals(pos: np.ndarray, neg: np.ndarray, k: int, root_split: int) -> Intervals:
    """One label's fine histograms (n_bins,) as the intervals the floor allows (see the module's docstring);
    root_split is the first bin above the run's threshold, the first cut tried."""
    count = np.concatenate([[0], np.cumsum(pos + neg)])  # count[b] = images in bins below b
    n_bins = len(pos)

    def held(lo: int, hi: int) -> int:
        return int(count[hi] - count[lo])

    def keeps_floor(lo: int, cut: int, hi: int) -> bool:
        return all(held(a, b) == 0 or held(a, b) >= k for a, b in ((lo, cut), (cut, hi)))

    def visit(lo: int, hi: int, first: list[int]) -> list[int]:
        if held(lo, hi) == 0:
            return [lo]
        cut = next((c for c in first + candidates(lo, hi) if lo < c < hi and keeps_floor(lo, c, hi)), None)
        return [lo] if cut is None else visit(lo, cut, []) + visit(cut, hi, [])

    starts = visit(0, n_bins, [root_split])
    bounds = starts + [n_bins]
    kept = [s for i, s in enumerate(starts) if i == 0 or held(s, bounds[i + 1]) or held(bounds[i - 1], s)]  # merge empty runs
    kept = np.array(kept, np.int64)
    ends = np.append(kept[1:], n_bins)
    cum_pos, cum_neg = np.concatenate([[0], np.cumsum(pos)]), np.concatenate([[0], np.cumsum(neg)])
    return Intervals(kept, (cum_pos[ends] - cum_pos[kept]).astype(np.int64), (cum_neg[ends] - cum_neg[kept]).astype(np.int64))


def breaks_floor(intervals: Intervals, k: int) -> int | None:
    """The size of a non-empty interval holding fewer than k images, or None when every interval keeps the floor (a
    single interval over every bin says only how many positives and negatives there are, which is sent anyway)."""
    if len(intervals.starts) == 1:
        return None
    held = intervals.pos + intervals.neg
    small = held[(held > 0) & (held < k)]
    return int(small.min()) if len(small) else None


def _self_consistent(starts: list[np.ndarray], ends: list[np.ndarray], counts: list[np.ndarray], n_bins: int) -> np.ndarray:
    """Turnbull's self-consistency estimate (n_bins,) of where interval-censored counts lie: each interval's count is
    spread over its bins in proportion to the current estimate there, until the estimate stops moving."""
    lo, hi, c = np.concatenate(starts), np.concatenate(ends), np.concatenate(counts).astype(np.float64)
    lo, hi, c = lo[c > 0], hi[c > 0], c[c > 0]
    if not len(c):
        return np.zeros(n_bins)
    member = (np.arange(n_bins)[None, :] >= lo[:, None]) & (np.arange(n_bins)[None, :] < hi[:, None])  # (g, n_bins)
    density = (member / member.sum(1, keepdims=True) * c[:, None]).sum(0)  # start: even spreading
    for _ in range(EM_ITERATIONS):
        share = member * density[None, :]
        within = share.sum(1, keepdims=True)
        share = np.where(within > 0, share / np.where(within > 0, within, 1), member / member.sum(1, keepdims=True))
        updated = (share * c[:, None]).sum(0)
        if np.abs(updated - density).max() < EM_TOLERANCE * c.sum():
            return updated
        density = updated
    return density


def pooled(sites: list[Intervals], n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The sites' intervals of one label pooled into fine histograms (n_bins,) float of positives and negatives."""
    starts, ends = [s.starts for s in sites], [s.ends(n_bins) for s in sites]
    return (_self_consistent(starts, ends, [s.pos for s in sites], n_bins), _self_consistent(starts, ends, [s.neg for s in sites], n_bins))


def auc_bounds(sites: list[Intervals], n_bins: int) -> tuple[float, float]:
    """The lowest and highest AUC that any placement of the images inside their intervals gives (NaN, NaN without
    both classes): a positive beats a negative for sure only where its interval lies wholly above the negative's."""
    pos_lo = np.concatenate([s.starts for s in sites])
    pos_hi = np.concatenate([s.ends(n_bins) for s in sites])
    p, n = np.concatenate([s.pos for s in sites]).astype(np.float64), np.concatenate([s.neg for s in sites]).astype(np.float64)
    if p.sum() == 0 or n.sum() == 0:
        return float("nan"), float("nan")
    pairs = p[:, None] * n[None, :]  # (positive interval, negative interval)
    wins = pos_lo[:, None] >= pos_hi[None, :]  # the negative's interval ends where the positive's begins, or below
    losses = pos_hi[:, None] <= pos_lo[None, :]
    total = p.sum() * n.sum()
    return float(pairs[wins].sum() / total), float(1.0 - pairs[losses].sum() / total)
