"""markdown.markdown_table: columns first, then rows; cells formatted and escaped."""
from sharp_unlearn.markdown import fmt, fmt_result, markdown_table


def test_table_shape_missing_cells_and_escaping():
    text = markdown_table(["a", "b"], [{"a": 1, "b": "x|y"}, {"a": "two\nlines"}])
    assert text == "| a | b |\n|---|---|\n| 1 | x\\|y |\n| two lines |  |\n"


def test_default_and_result_number_formats():
    assert [fmt(v) for v in (None, 0.123456, 1234.56, float("nan"), 3)] == ["", "0.1235", "1234.6", "nan", "3"]
    assert [fmt_result(v) for v in (None, 0.123456, 85.126, float("nan"))] == ["", "0.1235", "85.13", "nan"]
    assert markdown_table(["acc"], [{"acc": 85.126}], cell=fmt_result).splitlines()[-1] == "| 85.13 |"
