"""Federated evaluation means: each metric over the sites where it is defined, weighted by their videos."""

from __future__ import annotations

import math

import pytest

from fedecho.report import fmt_metrics, fmt_round
from fedecho.server.rounds import weighted_means
from fedecho.storage.store import SITES_SUFFIX


def test_an_undefined_metric_is_left_out_with_its_weight() -> None:
    # site01's validation split has one class: its AUROC is undefined (NaN); site02's is 1.0
    means = weighted_means(
        [
            {"num-examples": 5.0, "val_ef_class_auroc": math.nan, "val_ef_mae": 4.0},
            {"num-examples": 3.0, "val_ef_class_auroc": 1.0, "val_ef_mae": 8.0},
        ]
    )
    assert means["val_ef_class_auroc"] == 1.0  # not 0.375 (NaN counted as 0) nor 0.625
    assert means["val_ef_class_auroc" + SITES_SUFFIX] == 1.0
    assert means["val_ef_mae"] == pytest.approx((5 * 4.0 + 3 * 8.0) / 8)
    assert means["val_ef_mae" + SITES_SUFFIX] == 2.0


def test_no_site_with_a_value_means_no_mean() -> None:
    means = weighted_means([{"num-examples": 4.0, "val_r2": math.nan}, {"num-examples": 0.0, "val_r2": 0.5}])
    assert means == {}  # a site with no validation videos carries no weight either


def test_the_report_says_how_many_sites_a_mean_is_over() -> None:
    means = weighted_means([{"num-examples": 5.0, "val_auroc": math.nan}, {"num-examples": 3.0, "val_auroc": 1.0}])
    assert fmt_metrics(means) == "val_auroc=1 (1 site)"
    # a round's line names the count only where a mean is over fewer sites than the others
    means = weighted_means(
        [
            {"num-examples": 5.0, "val_auroc": math.nan, "val_mae": 2.0},
            {"num-examples": 3.0, "val_auroc": 1.0, "val_mae": 4.0},
        ]
    )
    assert fmt_round({"sites": "2/2", **means}) == "sites 2/2, val_mae 2.75, val_auroc 1 (1 site)"
