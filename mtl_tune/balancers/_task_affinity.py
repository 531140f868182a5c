"""The task-affinity pieces of ``stgu`` (mtl_tune/balancers/stgu.py has the method and its maths):
the EMA update of the proximal inter-task affinity, the similarity, and the grouping by affinity
propagation (sklearn, with the K = 2 closed form of :class:`PairGrouping`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from mtl_tune.balancers.base import BalancerError

ZERO_DIAGONAL = 1e-12


def affinity_update(affinity: np.ndarray, group: Sequence[int], before: np.ndarray, after: np.ndarray,
                    decay: float) -> np.ndarray:
    """One EMA update of the proximal inter-task affinity for group ``group`` (returns a new array).

    ``before``/``after``: per-task losses around the update; NaN in ``before`` = not measured
    (that target is skipped). See the module docstring for the formula; the arithmetic is
    :func:`affinity_update_rows` on one row.
    """
    before = np.asarray(before, dtype=np.float64)
    valid = np.isfinite(before)
    if np.any(before[valid] <= 0):
        raise BalancerError(f"stgu: affinities are relative loss decreases and need positive losses, got {before}")
    members = np.zeros((1, before.shape[-1]), dtype=bool)
    members[0, list(group)] = True
    return affinity_update_rows(np.asarray(affinity, dtype=np.float64)[None], members, before[None],
                                np.asarray(after, dtype=np.float64)[None], decay)[0]


_DIAGONALS: dict[int, np.ndarray] = {}   # K → the diagonal entries of a K × K affinity


def _diagonal(k: int) -> np.ndarray:
    diagonal = _DIAGONALS.get(k)
    if diagonal is None:
        diagonal = _DIAGONALS[k] = np.eye(k, dtype=bool)
    return diagonal


def affinity_update_rows(affinity: np.ndarray, members: np.ndarray, before: np.ndarray, after: np.ndarray,
                         decay: np.ndarray | float) -> np.ndarray:
    """The affinity EMA on a batch of B affinities at once (returns a new array): the formula of the
    module docstring (official ``form_task_affinity.update``), its per-entry branches as masks.

    ``affinity`` (B, K, K); ``members`` (B, K) bool, each row's group, with ``before``/``after``
    (B, K) the losses around the update — or (N, B, K) each: N updates applied in order (a
    batch's group steps), a row with no member being left alone by that update. ``before`` > 0
    where finite (the caller checks: :func:`affinity_update` raises, the rows rule fails the row);
    a non-finite ``before`` = not measured: that target is skipped. ``decay`` a float, (B,) or
    (B, 1, 1).

    Entry (s, t) is updated for s ∈ g, with a_t = (1 − ℓ_t^after/ℓ_t^before)/|g|: the diagonal
    only by a_s ≥ 0 (``not a_s < 0``); an off-diagonal entry by −max(a_t, a_s) when t ∈ g, a_s is
    finite and a_t a_s < 0, else by a_t; A ← (1 − decay) A + decay · value. Element by element
    these are the official loop's floating-point operations (a sign test of the product, an exact
    negation), so the result is that loop's bit for bit (tests/balancers/test_stgu.py keeps the
    loop as the reference) — at O(1) NumPy calls instead of O(|g| K) Python steps.
    """
    m = np.asarray(members, dtype=bool)
    before = np.asarray(before, dtype=np.float64)
    # every target measured: one reduction in the common case (a finite sum), the entries otherwise
    measured = bool(np.isfinite(before.sum())) or bool(np.isfinite(before).all())
    if not measured:  # an unmeasured target is skipped: any finite divisor keeps its a out of every branch
        valid = np.isfinite(before)
        before = np.where(valid, before, 1.0)
    # (a float decay stays a Python float: the same float64 products as a 0-d array's, fewer calls)
    d = decay if isinstance(decay, float) else np.asarray(decay, dtype=np.float64)
    if np.ndim(d):
        d = d.reshape(-1, 1, 1)
    diagonal = _diagonal(m.shape[-1])
    size = m.sum(-1, keepdims=True)
    a = (1.0 - np.asarray(after, dtype=np.float64) / before) / np.maximum(size, 1)
    a_t, a_s = a[..., None, :], a[..., :, None]        # target (column) and source (row) of entry (s, t)
    if size.max() > 1:  # a sign conflict needs two members (s ≠ t, both in g)
        source_ok = np.isfinite(a_s) if measured else np.isfinite(a_s) & valid[..., :, None]
        # (no off-diagonal mask needed: on the diagonal the product is a_s² ≥ 0 or NaN, never < 0)
        conflict = (a_t * a_s < 0) & m[..., None, :] & source_ok
        value = np.where(conflict, -np.maximum(a_t, a_s), a_t)
    else:
        value = a_t
    update = m[..., :, None] & ~(diagonal & (a_t < 0))
    if not measured:
        update &= valid[..., None, :]
    keep, step = 1.0 - d, d * value
    out = np.asarray(affinity, dtype=np.float64)
    if m.ndim == 2:
        return np.where(update, keep * out + step, out)
    for upd, add in zip(update, step):  # in order: each EMA step starts from the previous one
        out = np.where(upd, keep * out + add, out)
    return out


_BELOW: dict[int, np.ndarray] = {}   # K → the entries below the diagonal of a K × K matrix


def _below(k: int) -> np.ndarray:
    below = _BELOW.get(k)
    if below is None:
        below = _BELOW[k] = np.tril(np.ones((k, k), dtype=bool), -1)
    return below


def affinity_similarity(affinity: np.ndarray, official: bool | np.ndarray = False) -> np.ndarray:
    """S = (X + Xᵀ)/2 with X[:, i] = A[:, i] / A[i, i] (zero-diagonal guard, see the docstring).

    ``affinity`` (K, K), or a batch (…, K, K) (the same operations on each matrix). ``official``
    (a bool, or one per matrix of the batch): X[j, i] = A[j, i] for j > i, as the official in-place
    ``X[:, i] /= X[i, i]`` leaves the entries below the diagonal (module docstring)."""
    a = np.asarray(affinity, dtype=np.float64)
    diag = a.diagonal(0, -2, -1)   # (the methods, not np.diagonal / np.swapaxes: no Python wrapper)
    positive = diag > ZERO_DIAGONAL
    if positive.all():   # (the common case, past the first few batches: no guard to evaluate)
        divisor = diag
    else:
        col_max = np.max(np.abs(a), axis=-2)
        divisor = np.where(positive, diag, np.where(col_max > 0, col_max, 1.0))
    x = a / divisor[..., None, :]
    if official is not False and np.any(official):
        official = np.asarray(official, dtype=bool)
        below = _below(a.shape[-1])
        x = np.where(below & official.reshape(official.shape + (1, 1)), a, x)
    return (x + x.swapaxes(-1, -2)) / 2.0


def quantile_neighbours(n: int, q: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where NumPy's linear-method quantile q of n values lies: sorted indices (i, j) and weight γ.

    As ``np.quantile``: virtual index v = (n − 1) q, i = ⌊v⌋, j = i + 1, γ = v − i, except that
    v ≥ n − 1 takes the maximum (i = j = n − 1, γ = v + 1: NumPy sets i to −1 before γ).
    """
    virtual = (n - 1) * np.asarray(q, dtype=np.float64)
    top = virtual >= n - 1
    lower = np.where(top, -1.0, np.floor(virtual))
    gamma = virtual - lower
    i = np.where(top, n - 1, lower).astype(np.intp)
    j = np.where(top, n - 1, lower + 1).astype(np.intp)
    return i, j, gamma


def interpolate(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """NumPy's quantile ``_lerp``: a + (b − a) γ, or b − (b − a)(1 − γ) where γ ≥ 0.5."""
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def linear_quantile(values: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """``np.quantile(values[b], q[b])`` (method "linear") for every row b, with NumPy's arithmetic.

    ``values`` (B, n), ``q`` (B,) or a scalar. Reproduced operation by operation
    (:func:`quantile_neighbours`, :func:`interpolate`) because the K = 2 grouping compares this
    value with a similarity (:class:`PairGrouping`): an ulp decides there.
    """
    v = np.asarray(values, dtype=np.float64)
    i, j, gamma = quantile_neighbours(v.shape[-1], np.broadcast_to(q, v.shape[:-1]))
    ordered = np.sort(v, axis=-1)
    rows = np.arange(v.shape[0])
    return interpolate(ordered[rows, i], ordered[rows, j], gamma)


class PairGrouping:
    """K = 2: whether affinity propagation puts the two tasks into two groups (else one), for
    B rows with fixed preference quantiles (positions computed once: the per-batch cost is a sort
    of four numbers and a comparison).

    Why there is a closed form: sklearn's ``_affinity_propagation`` first checks whether all
    preferences are equal (one scalar preference: always) and all off-diagonal similarities are
    equal — for K = 2 these are S[0, 1] and S[1, 0], equal in a symmetric S — and then returns
    without iterating: one cluster per sample when preference > S[0, 1], else a single cluster
    (its "All samples have mutually equal similarities" branch). So for K = 2 the damping, the
    random_state noise, ``convergence_iter``, the retries and the "no exemplar" outcome never
    come into play: two groups ⟺ quantile_q(S) > S[0, 1], with the quantile over the four
    entries (diagonal included) exactly as :func:`group_tasks` computes it. Valid for finite S
    with S[0, 1] == S[1, 0] (sklearn raises on non-finite input; :func:`affinity_similarity` is
    symmetric by construction).
    """

    def __init__(self, preference_quantile: np.ndarray | float) -> None:
        q = np.atleast_1d(np.asarray(preference_quantile, dtype=np.float64))
        self.i, self.j, self.gamma = quantile_neighbours(4, q)
        # one quantile for every row: its sorted positions and weight as Python scalars (basic
        # indexing, and the interpolation's branch chosen once: the same arithmetic as interpolate)
        self.scalar = (int(self.i[0]), int(self.j[0]), float(self.gamma[0])) if q.size == 1 else None

    def split(self, similarity: np.ndarray) -> np.ndarray:
        """(B,) bool from (B, 2, 2) similarities: True = two groups {0}, {1} (one quantile for every
        row, or one per row)."""
        ordered = np.sort(similarity.reshape(-1, 4), axis=-1)
        if self.scalar is not None:
            i, j, gamma = self.scalar
            low, high = ordered[:, i], ordered[:, j]
            diff = high - low
            preference = high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma
        else:
            rows = np.arange(ordered.shape[0])
            preference = interpolate(ordered[rows, self.i], ordered[rows, self.j], self.gamma)
        return preference > similarity[:, 0, 1]


def group_tasks(similarity: np.ndarray, preference_quantile: float = 0.5, convergence_iter: int = 50,
                tries: int = 10) -> list[list[int]] | None:
    """Affinity-propagation clusters of the K tasks (sorted lists), or None if AP never converges.

    K = 2 with a finite symmetric S takes sklearn's own no-iteration branch in closed form
    (:class:`PairGrouping`; ~1 ms saved per batch); everything else runs sklearn
    (:func:`propagate_groups`), which also raises on non-finite similarities.
    """
    s = np.asarray(similarity, dtype=np.float64)
    k = s.shape[0]
    if k == 1:
        return [[0]]
    if k == 2 and bool(np.isfinite(s).all()) and s[0, 1] == s[1, 0]:
        return [[0], [1]] if bool(PairGrouping(preference_quantile).split(s[None])[0]) else [[0, 1]]
    return propagate_groups(s, float(np.quantile(s, preference_quantile)), convergence_iter, tries)


def propagate_groups(similarity: np.ndarray, preference: float, convergence_iter: int = 50,
                     tries: int = 10) -> list[list[int]] | None:
    """sklearn ``AffinityPropagation`` on a precomputed similarity with a scalar ``preference``:
    clusters as sorted lists, retried with a longer ``convergence_iter``; None if no try finds
    an exemplar."""
    # sklearn is imported here, not with the module: it costs ~1 s of every process that imports the
    # balancer registry (the search's workers, --help, the toy), and K = 2 never reaches it
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    s = np.asarray(similarity, dtype=np.float64)
    for attempt in range(tries):
        ap = AffinityPropagation(affinity="precomputed", preference=preference,
                                 convergence_iter=convergence_iter + 100 * attempt, random_state=0)
        with warnings.catch_warnings():
            # non-convergence is detected below and counted by the caller; sklearn's note on
            # all-equal similarities is a tie (it then returns one group, or one per task when
            # the preference exceeds the common similarity), not a failure
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="All samples have mutually equal similarities")
            labels = ap.fit(s).labels_
        if len(ap.cluster_centers_indices_) > 0 and np.all(labels >= 0):
            return [sorted(int(i) for i in np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return None
