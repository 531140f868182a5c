"""Published per-metric result tables (NYUv2, Cityscapes; docs/benchmarks.md#published-results), as printed.

Every number is copied from the cited paper tables (means over 3 seeds; test metrics
averaged over the last 10 epochs; SegNet-MTAN, Nash-MTL protocol). Metric names are the
benchmarks' own (``seg/pixacc``, as :mod:`mtl_tune.benchmarks.nyuv2` reports it). Percent-valued
metrics stay in percent as printed, and the STL baselines are given in the same units, so
Δm% (a ratio) is unchanged by the scaling; the benchmarks report mIoU, PixAcc and the
normal-angle fractions as fractions, so :meth:`PublishedTable.in_benchmark_units` converts
before a published row is put next to a trial's metrics. ``printed_delta_m`` / ``printed_mean_rank`` are
the papers' own columns, kept to test that our Δm% and MR reproduce them.

Known inconsistencies (kept as printed, documented in the tests):

* NYUv2 IMTL-G: the per-metric numbers give Δm% = −0.60, the printed value is −0.76; the
  row is copied with the error into every later paper.
* Cityscapes LS: GO4Align Table 8 prints the SI row for LS (copy error); the LS row
  below is NTKMTL's, consistent with its Δm%.
* MR is table-relative: NTKMTL T1's MR column is over its 21 NYUv2 rows (LS … NTKMTL-SR,
  STL excluded), GO4Align T1's over 13 of them (reproduced exactly, no ties); Cityscapes
  NTKMTL T7 over its 17 rows (reproduced exactly when a tie takes the worse rank). NTKMTL
  T1 is off by whole rank positions for SI, DWA, MGDA, Nash-MTL and NTKMTL-SR under every
  tie rule (see tests/test_analysis_tables.py and docs/analysis.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from mtl_tune.metrics import MetricSpec


@dataclass(frozen=True)
class PublishedTable:
    """One published comparison table.

    ``metrics``: the columns (name, task, direction, STL baseline in table units);
    ``rows``: method → values in ``metrics`` order (STL excluded);
    ``printed_delta_m`` and ``printed_mean_rank`` (source → method → MR) as printed.
    """

    benchmark: str
    source: str
    metrics: tuple[MetricSpec, ...]
    rows: dict[str, tuple[float, ...]]
    printed_delta_m: dict[str, float]
    printed_mean_rank: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: str = ""

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(m.task for m in self.metrics))

    def frame(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Methods × metric names DataFrame of the per-metric values (``methods`` selects rows)."""
        names = list(self.rows) if methods is None else list(methods)
        return pd.DataFrame([self.rows[m] for m in names], index=pd.Index(names, name="method"),
                            columns=[m.name for m in self.metrics], dtype=float)

    def in_benchmark_units(self, specs: tuple[MetricSpec, ...] | None = None) -> pd.DataFrame:
        """:meth:`frame` in the units the benchmark reports (``specs``: its metric specs, by
        default the registered benchmark's): a column is divided by 100 where the published STL
        baseline is 100 × the benchmark's (percent → fraction). Raises when a column has no
        counterpart or the baselines agree in neither unit."""
        if specs is None:
            from mtl_tune.registry import benchmark_class

            specs = tuple(benchmark_class(self.benchmark).metrics)
        theirs = {s.name: s for s in specs}
        frame = self.frame()
        for m in self.metrics:
            if m.name not in theirs or theirs[m.name].baseline is None:
                raise KeyError(f"published {self.benchmark} metric {m.name!r} has no baseline in the benchmark's specs")
            ratio = float(m.baseline) / float(theirs[m.name].baseline)
            if abs(ratio - 100.0) < 1e-6 * 100:
                frame[m.name] = frame[m.name] / 100.0
            elif abs(ratio - 1.0) > 1e-6:
                raise ValueError(f"published {self.benchmark} {m.name}: baseline {m.baseline} vs the benchmark's "
                                 f"{theirs[m.name].baseline} is neither the same unit nor percent vs fraction")
        return frame

    def baseline(self) -> pd.Series:
        """The STL row (metric name → value)."""
        return pd.Series({m.name: m.baseline for m in self.metrics}, dtype=float, name="STL")


def _spec(name: str, task: str, higher: bool, baseline: float) -> MetricSpec:
    return MetricSpec(name, task, higher_is_better=higher, baseline=baseline)


NYUV2_METRICS = (
    _spec("seg/miou", "seg", True, 38.30), _spec("seg/pixacc", "seg", True, 63.76),
    _spec("depth/abs_err", "depth", False, 0.6754), _spec("depth/rel_err", "depth", False, 0.2780),
    _spec("normal/mean", "normal", False, 25.01), _spec("normal/median", "normal", False, 19.21),
    _spec("normal/within_11_25", "normal", True, 30.14), _spec("normal/within_22_5", "normal", True, 57.20),
    _spec("normal/within_30", "normal", True, 69.15),
)

# method: (mIoU, PixAcc, AbsErr, RelErr, Mean, Median, <11.25, <22.5, <30), MR (NTKMTL T1), Δm%
_NYUV2 = {
    "LS": ((39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08), 17.44, 5.59),
    "SI": ((38.45, 64.27, 0.5354, 0.2201, 27.60, 23.37, 22.53, 48.57, 62.32), 16.11, 4.39),
    "RLW": ((37.17, 63.77, 0.5759, 0.2410, 28.27, 24.18, 22.26, 47.05, 60.62), 20.22, 7.78),
    "DWA": ((39.11, 65.31, 0.5510, 0.2285, 27.61, 23.18, 24.17, 50.18, 62.39), 16.33, 3.57),
    "UW": ((36.87, 63.17, 0.5446, 0.2260, 27.04, 22.61, 23.54, 49.05, 63.65), 16.00, 4.05),
    "MGDA": ((30.47, 59.90, 0.6070, 0.2555, 24.88, 19.45, 29.18, 56.88, 69.36), 11.44, 1.38),
    "PCGrad": ((38.06, 64.64, 0.5550, 0.2325, 27.41, 22.80, 23.86, 49.83, 63.14), 16.89, 3.97),
    "GradDrop": ((39.39, 65.12, 0.5455, 0.2279, 27.48, 22.96, 23.38, 49.44, 62.87), 15.56, 3.58),
    "CAGrad": ((39.79, 65.49, 0.5486, 0.2250, 26.31, 21.58, 25.61, 52.36, 65.58), 11.56, 0.20),
    "IMTL-G": ((39.35, 65.60, 0.5426, 0.2256, 26.02, 21.19, 26.20, 53.13, 66.24), 10.89, -0.76),
    "MoCo": ((40.30, 66.07, 0.5575, 0.2135, 26.67, 21.83, 25.61, 51.78, 64.85), 10.89, 0.16),
    "Nash-MTL": ((40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15), 8.00, -4.04),
    "Aligned-MTL": ((40.15, 66.05, 0.5520, 0.2291, 25.37, 19.89, 28.30, 55.29, 67.95), 10.44, -3.12),
    "FAMO": ((38.88, 64.90, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98), 9.00, -4.10),
    "SDMGrad": ((40.47, 65.90, 0.5225, 0.2084, 25.07, 19.99, 28.54, 55.74, 68.53), 6.11, -4.84),
    "DB-MTL": ((41.42, 66.45, 0.5251, 0.2160, 25.03, 19.50, 28.72, 56.17, 68.73), 4.56, -5.36),
    "STCH": ((41.35, 66.07, 0.4965, 0.2010, 26.55, 21.81, 24.84, 51.39, 64.86), 8.22, -1.35),
    "FairGrad": ((39.74, 66.01, 0.5377, 0.2236, 24.84, 19.60, 29.26, 56.58, 69.16), 6.44, -4.66),
    "GO4Align": ((40.42, 65.37, 0.5492, 0.2167, 24.76, 18.94, 30.54, 57.87, 69.84), 5.00, -6.08),
    "NTKMTL": ((39.68, 65.43, 0.5296, 0.2168, 24.24, 18.63, 30.74, 58.72, 70.78), 4.33, -6.99),
    "NTKMTL-SR": ((40.23, 65.28, 0.5261, 0.2136, 24.88, 19.58, 29.53, 56.67, 69.08), 5.56, -5.35),
}

NYUV2 = PublishedTable(
    benchmark="nyuv2",
    source="NTKMTL (Qin et al., NeurIPS'25, arXiv 2510.18258) Table 1; baseline rows from the original papers",
    metrics=NYUV2_METRICS,
    rows={m: v for m, (v, _, _) in _NYUV2.items()},
    printed_delta_m={m: d for m, (_, _, d) in _NYUV2.items()},
    printed_mean_rank={
        "NTKMTL T1": {m: r for m, (_, r, _) in _NYUV2.items()},
        "GO4Align T1": {"MGDA": 7.00, "PCGrad": 9.00, "GradDrop": 7.89, "CAGrad": 5.33, "IMTL-G": 4.56,
                        "Nash-MTL": 2.89, "LS": 9.89, "SI": 8.78, "RLW": 12.22, "DWA": 8.67, "UW": 8.33,
                        "FAMO": 4.33, "GO4Align": 2.11},
    },
    notes="IMTL-G printed Δm% −0.76 is inconsistent with its per-metric values (−0.60).",
)

CITYSCAPES_METRICS = (
    _spec("seg/miou", "seg", True, 74.01), _spec("seg/pixacc", "seg", True, 93.16),
    _spec("depth/abs_err", "depth", False, 0.0125), _spec("depth/rel_err", "depth", False, 27.77),
)

# method: (mIoU, PixAcc, AbsErr, RelErr), MR (NTKMTL T7), Δm%
_CITYSCAPES = {
    "LS": ((75.18, 93.49, 0.0155, 46.77), 10.25, 22.60),
    "SI": ((70.95, 91.73, 0.0161, 33.83), 14.00, 14.11),
    "RLW": ((74.57, 93.41, 0.0158, 47.79), 12.25, 24.38),
    "DWA": ((75.24, 93.52, 0.0160, 44.37), 9.75, 21.45),
    "UW": ((72.02, 92.85, 0.0140, 30.13), 10.00, 5.89),
    "MGDA": ((68.84, 91.54, 0.0309, 33.50), 14.75, 44.14),
    "PCGrad": ((75.13, 93.48, 0.0154, 42.07), 10.50, 18.29),
    "CAGrad": ((75.16, 93.48, 0.0141, 37.60), 9.25, 11.64),
    "IMTL-G": ((75.33, 93.49, 0.0135, 38.41), 7.25, 11.10),
    "Nash-MTL": ((75.41, 93.66, 0.0129, 35.02), 4.75, 6.82),
    "FAMO": ((74.54, 93.29, 0.0145, 32.59), 9.25, 8.13),
    "Aligned-MTL": ((75.77, 93.69, 0.0133, 32.66), 3.00, 5.27),
    "SDMGrad": ((74.53, 93.52, 0.0137, 34.01), 8.25, 7.74),
    "GO4Align": ((72.63, 93.03, 0.0164, 27.58), 10.75, 8.13),
    "FairGrad": ((75.72, 93.68, 0.0134, 32.25), 3.25, 5.18),
    "NTKMTL": ((73.71, 92.71, 0.0136, 27.21), 8.50, 1.92),
    "NTKMTL-SR": ((72.58, 92.93, 0.0124, 31.65), 8.00, 3.84),
}

CITYSCAPES = PublishedTable(
    benchmark="cityscapes",
    source="NTKMTL (Qin et al., NeurIPS'25) Table 7; baseline rows from the original papers",
    metrics=CITYSCAPES_METRICS,
    rows={m: v for m, (v, _, _) in _CITYSCAPES.items()},
    printed_delta_m={m: d for m, (_, _, d) in _CITYSCAPES.items()},
    printed_mean_rank={"NTKMTL T7": {m: r for m, (_, r, _) in _CITYSCAPES.items()}},
    notes="GO4Align Table 8 repeats the SI row as LS; NTKMTL's LS row is used here.",
)

TABLES: dict[str, PublishedTable] = {"nyuv2": NYUV2, "cityscapes": CITYSCAPES}


def published_table(benchmark: str) -> PublishedTable:
    """The published table of ``benchmark`` ("nyuv2" or "cityscapes")."""
    if benchmark not in TABLES:
        raise KeyError(f"no published table for {benchmark!r}; available: {', '.join(TABLES)}")
    return TABLES[benchmark]
