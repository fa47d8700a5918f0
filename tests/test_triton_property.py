"""Property-based test of the Triton conv over shapes, strides, paddings, groups and layouts (bounded: < 1 min on CPU).

Apart from tests/test_triton.py so that a machine without hypothesis (the GPU check machine) still
runs every other Triton test.
"""

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_triton import check_conv, conv_inputs, needs_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("nan_filled_empty_exact_fp32")


@needs_triton
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_conv_property(data):
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    c_g = data.draw(st.integers(1, 20), label="c_per_group")
    k_g = data.draw(st.integers(1, 20), label="k_per_group")
    kh, kw = data.draw(st.sampled_from([1, 3, 5, 7]), label="kh"), data.draw(st.sampled_from([1, 2, 3]), label="kw")
    stride = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="stride")
    padding = data.draw(st.tuples(st.integers(0, 3), st.integers(0, 2)), label="padding")
    h, w = data.draw(st.integers(1, 11), label="h"), data.draw(st.integers(1, 11), label="w")
    assume(h + 2 * padding[0] >= kh and w + 2 * padding[1] >= kw)
    n = data.draw(st.integers(1, 2), label="n")
    layout = data.draw(st.sampled_from(["nchw", "channels_last", "sliced"]), label="layout")
    bias, residual, relu = (data.draw(st.booleans(), label=name) for name in ("bias", "residual", "relu"))
    x, weight, b, res = conv_inputs(n, c_g * groups, h, w, k_g * groups, (kh, kw), stride, padding, groups,
                                    layout=layout, bias=bias, residual=residual)
    check_conv(x, weight, b, res, stride, padding, groups, relu)
