"""Text rules shared by the Python pair reference (``backend.pairs``) and the SQL one (``storage.pair_sql``).

``normalize_answer`` is SeVa's "equal answers" rule. The SQL path registers this very function as a
DuckDB scalar function, so both paths compare answers with the same code (Python's ``str.split`` and
``casefold`` have no exact DuckDB equivalent for every Unicode character).
"""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Whitespace runs (Unicode, as ``str.split``) collapsed to one space, ends trimmed, case folded."""
    return " ".join(text.split()).casefold()
