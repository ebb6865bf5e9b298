"""projects/benchmarks/search_signal.py: the statistics it reports on the alphas' gradients, checked
against values worked out by hand and closed forms (its run on a search is in test_search.py)."""

import math

import numpy as np
import pytest
import search_signal as ss  # projects/benchmarks, on pytest's pythonpath

from elixir_d2.modeling.alb.spaces import get_search_space

# Two alphas over four batches: the first's gradient has mean 2 and sample std sqrt(2/3), the
# second's mean 0.
GRADS = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0], [2.0, -1.0]])


def test_t_of_the_mean_gradient_by_hand():
    np.testing.assert_allclose(ss.gradient_t(GRADS), [2.0 / (math.sqrt(2 / 3) / 2), 0.0])
    with pytest.raises(ValueError, match="at least 2 batches"):
        ss.gradient_t(GRADS[:1])


def test_summary_by_hand():
    s = ss.signal_summary(GRADS)
    assert s["batches"] == 4
    assert s["snr_median"] == pytest.approx((2 / math.sqrt(2 / 3)) / 2)  # median of 2.449 and 0
    assert s["t_median"] == pytest.approx(2 / (math.sqrt(2 / 3) / 2) / 2)
    assert s["share_t2"] == 0.5 and s["share_t3"] == 0.5  # t = 4.9 and 0


@pytest.mark.parametrize("x", [0.5, 1.0, 3.0])
def test_t_tail_one_degree_of_freedom_is_cauchy(x):
    assert ss.t_tail(x, 1) == pytest.approx(1 - 2 / math.pi * math.atan(x), abs=1e-6)


def test_t_tail_against_the_table_and_the_normal_limit():
    assert ss.t_tail(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # two-sided 5% point, df 10
    assert ss.t_tail(2.0, 10**6) == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=1e-5)


def test_gradient_genotype_takes_the_inputs_and_ops_the_gradient_favours():
    """Per branch b (inputs 0..b+1), input j's edge has t = -(j + 1) on op 1 + j % 8 (normal) or
    -(b + 2 - j) (reduce), and t = -10 on `none`, which is never chosen: the normal block keeps
    each branch's last two inputs, the reduce block its first two, with those ops."""
    ops = get_search_space("elixir")
    t = np.zeros((2, 14, len(ops)))
    expect = {"normal": [], "reduce": []}
    edge = 0
    for b in range(4):
        for j in range(b + 2):
            op = 1 + j % 8
            t[0, edge, op] = -(j + 1)
            t[1, edge, op] = -(b + 2 - j)
            t[:, edge, 0] = -10.0
            if j >= b:
                expect["normal"].append((ops[op], j))
            if j < 2:
                expect["reduce"].append((ops[op], j))
            edge += 1
    g = ss.gradient_genotype(t.ravel(), "elixir", 4)
    assert list(g.normal) == expect["normal"] and list(g.reduce) == expect["reduce"]
