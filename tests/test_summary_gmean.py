"""The CLI summary's geometric mean of perplexity / dense perplexity over several test sets."""

from __future__ import annotations

import math

import pytest

from lightning_modules.cli import format_summary


def test_summary_prints_the_geometric_mean_and_the_worst_ratio():
    summary = {"wall_seconds": 1.0, "dense": {"a": {"ppl": 10.0}, "b": {"ppl": 4.0}, "c": {"ppl": 2.0}},
               "test": {"test/ppl/a": 20.0, "test/ppl/b": 4.0, "test/ppl/c": 16.0, "test/loss/a": 3.0}}
    line = next(x for x in format_summary(summary).splitlines() if "geometric mean" in x)
    expected = math.exp((math.log(2.0) + math.log(1.0) + math.log(8.0)) / 3)  # = 16 ** (1/3)
    assert "over 3 test sets" in line
    assert float(line.split(": ")[1].split()[0]) == pytest.approx(expected, abs=5e-4)
    assert "(worst 8.000)" in line


def test_no_geometric_mean_for_one_test_set_or_without_dense_figures():
    one = {"wall_seconds": 1.0, "dense": {"a": {"ppl": 10.0}}, "test": {"test/ppl/a": 20.0}}
    no_dense = {"wall_seconds": 1.0, "dense": {}, "test": {"test/ppl/a": 20.0, "test/ppl/b": 3.0}}
    assert "geometric mean" not in format_summary(one)
    assert "geometric mean" not in format_summary(no_dense)
