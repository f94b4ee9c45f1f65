"""render_png on anything at all: a PNG, or our own InvalidMapError — never another exception."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.errors import InvalidMapError
from worker.render import render_png

DTYPES = st.sampled_from(
    ["uint8", "int8", "int32", "int64", "uint16", "float16", "float32", "float64", "bool", "complex64", ">f4"]
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(DTYPES))
    shape = draw(SHAPES)
    if dtype.kind == "f":
        # mostly values in range, some out of it, NaN and inf
        elements = st.one_of(
            st.floats(0, 1, width=dtype.itemsize * 8),
            st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8),
        )
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(), st.booleans())
def test_render_png_gives_a_png_or_an_invalid_map_error_for_any_array(array: np.ndarray, fade: bool) -> None:
    try:
        png = render_png(array, fade_low_activation=fade)
    except InvalidMapError as exc:
        assert "expected" in str(exc)
    else:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=5),
        st.integers(),
        st.lists(st.lists(st.floats(), max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    )
)
def test_render_png_refuses_things_that_are_not_arrays_with_our_error(value: Any) -> None:
    try:
        render_png(value)
    except InvalidMapError:
        pass
    else:
        # A nested list of floats in [0, 1] is a valid map (np.asarray makes it float64).
        assert isinstance(value, list)
