"""A Hypothesis strategy for any JSON value, for the fuzz tests of parsers of outside input."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(
    keys: st.SearchStrategy[str] | None = None, *, max_leaves: int = 20, max_size: int = 5
) -> st.SearchStrategy[object]:
    """Any JSON value: big integers, finite floats, short text, nested lists and objects."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30),
        lambda children: (
            st.lists(children, max_size=max_size)
            | st.dictionaries(
                st.text(max_size=12) if keys is None else keys, children, max_size=max_size
            )
        ),
        max_leaves=max_leaves,
    )
