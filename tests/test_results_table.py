"""``schema.results_table``: Arrow reads the result rows itself (``Table.from_pylist``),
so the table must be exactly the one a Python list per column gives, for any row a
run can write (values of each column's type, NULLs, missing keys, carried columns)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schema import RESULT_SCHEMA, carried_array, carried_name, results_table


def reference_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The way results_table built its columns before (one Python list per column)."""
    columns: dict[str, pa.Array] = {}
    for field in RESULT_SCHEMA:
        columns[field.name] = pa.array([r.get(field.name) for r in rows], field.type)
    extra: dict[str, None] = {}
    for r in rows:
        for key in r.get("carried", {}) or {}:
            extra.setdefault(key, None)
    for key in extra:
        values = [(r.get("carried") or {}).get(key) for r in rows]
        columns[carried_name(key)] = carried_array(values)
    return pa.table(columns)


def _value(kind: pa.DataType) -> st.SearchStrategy[Any]:
    if pa.types.is_string(kind):
        return st.text(max_size=20)
    if pa.types.is_boolean(kind):
        return st.booleans()
    if pa.types.is_int32(kind):
        return st.integers(-(2**31), 2**31 - 1)
    if pa.types.is_integer(kind):
        return st.integers(-(2**63), 2**63 - 1)
    if pa.types.is_floating(kind):
        return st.floats(allow_nan=False)
    return st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    )


_ROW = st.fixed_dictionaries(
    {},
    optional={f.name: st.one_of(st.none(), _value(f.type)) for f in RESULT_SCHEMA}
    | {
        "carried": st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["shop", "id", "n", "tags"]),
                st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5)),
                max_size=3,
            ),
        )
    },
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(_ROW, max_size=8))
def test_results_table_is_the_table_one_list_per_column_gives(rows: list[dict[str, Any]]) -> None:
    got = results_table(rows)
    want = reference_table(rows)
    assert got.schema == want.schema
    assert got.equals(want)
