"""Output of the listing commands: tables that fit the terminal's width, and CSV.

A table has essential columns (always shown, in their shortest form if need be) and others, added, like the
richer forms of the essential ones, in order of `rank` while the terminal has room: an 80-column terminal gets a
readable table, a wider one more of it, and nothing is cut to an ellipsis. JSON and CSV always have every column.
"""

from __future__ import annotations

import csv
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

R = TypeVar('R')

COLUMN_GAP = 3  # between two columns of a table without vertical lines (padding, divider, padding)
# A text cell starting with one of these is a formula to a spreadsheet (CSV injection): it gets a leading quote.
_FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')


@dataclass(frozen=True)
class Column(Generic[R]):
    """A table column: its header and its forms (`variants`, functions of a row, richest first)."""

    header: str
    variants: tuple[Callable[[R], str], ...]
    essential: bool = False
    """Shown at any width, in its shortest form if nothing else fits."""
    rank: int = 10
    """When the column (or its richer form) gets room: lower first."""
    right: bool = False
    """Right-aligned (numbers)."""


def utc_text(moment: datetime, form: str = '%Y-%m-%d %H:%M:%S') -> str:
    """`moment` in UTC as `form` (strftime's), its year in 4 digits.

    glibc's `%Y` does not pad: a row started at 0001-01-01 showed as `1-01-01 00:00:00` among `YYYY-MM-DD` ones (QA).
    A naive `moment` is taken as UTC: asyncpg reads a `timestamptz` of `-infinity` as a naive `datetime.min`, which
    `astimezone` (local time first) took for the year 0 and failed on.
    """
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime(form.replace('%Y', f'{moment.year:04d}'))


def fitted_table(title: str, columns: Sequence[Column[R]], rows: Sequence[R], *, width: int) -> Table:
    """A table of `rows` with the columns, and the forms of them, that fit in `width` cells."""
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    from agentrt.agents.cli.transcript import visible_line

    # Made visible once here (measured as shown), then given to the table as plain `Text`, never as markup.
    cells = [[[visible_line(variant(row)) for row in rows] for variant in column.variants] for column in columns]

    def measure(index: int, variant: int) -> int:
        return max([cell_len(columns[index].header), *(cell_len(text) for text in cells[index][variant])])

    chosen: dict[int, int] = {i: len(c.variants) - 1 for i, c in enumerate(columns) if c.essential}

    def used() -> int:
        return sum(measure(i, v) for i, v in chosen.items()) + COLUMN_GAP * max(0, len(chosen) - 1)

    for index in sorted(range(len(columns)), key=lambda i: columns[i].rank):
        current = chosen.get(index)
        for variant in range(len(columns[index].variants)):
            if current is not None and variant >= current:
                break  # nothing richer than what it has fits
            chosen[index] = variant
            if used() <= width:
                break
            if current is None:
                del chosen[index]
            else:
                chosen[index] = current

    table = Table(title=title, title_justify='left', box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    shown = sorted(chosen)
    for index in shown:
        column = columns[index]
        table.add_column(column.header, justify='right' if column.right else 'left', overflow='fold')
    for row_index in range(len(rows)):
        table.add_row(*(Text(cells[index][chosen[index]][row_index]) for index in shown))
    return table


def text_cells(*values: str, one_line: bool = True) -> list[Text]:
    """Table cells that show `values` as they are. A plain string cell is rich markup: a key's name, a model's or an
    error's with `[red]` in it was styled, one with `[/bold]` was a MarkupError (an internal error instead of the
    table); terminal control characters (an escape sequence) are written out as `transcript.visible` does.

    Args:
        values: the cells' text.
        one_line: write out newlines and tabs too (`transcript.visible_line`): a listing's row is one line. False for
            a cell whose value may be text of several lines (`audit show`'s error message).
    """
    from rich.text import Text

    from agentrt.agents.cli.transcript import visible, visible_line

    shown = visible_line if one_line else visible
    return [Text(shown(value)) for value in values]


def print_csv(rows: Iterable[dict[str, Any]], *, columns: Sequence[str]) -> None:
    """Write `rows` as CSV on stdout: a header line, then one line per row; empty for None, decimals exact, times
    in ISO 8601, booleans `true`/`false`; text that a spreadsheet would run as a formula starts with `'`."""
    writer = csv.writer(sys.stdout, lineterminator='\n')
    writer.writerow(columns)
    # To a file or a pipe, the cells as stored (a script's). To a terminal, control characters written out, as the
    # table shows them: a stored model name's or error body's escape sequence retitled or cleared it (qa140).
    cell = _terminal_cell if _on_a_terminal(sys.stdout) else csv_cell
    for row in rows:
        writer.writerow([cell(row.get(name)) for name in columns])


def _on_a_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no descriptor (a test's stream), or closed
        return False


def _terminal_cell(value: Any) -> str:
    from agentrt.agents.cli.transcript import visible_line

    return visible_line(csv_cell(value))


def plain_decimal(value: Decimal, *, places: int = 0, grouped: bool = False) -> str:
    """A decimal in plain notation, exact: `0.000000001`, never `1E-9` (what `str()` gives under a millionth).

    Args:
        value: the amount.
        places: the fewest decimals shown (zeros added); more are shown when the value has them (none cut).
        grouped: thousands separated by commas, for a table.
    """
    text = format(value, ',f' if grouped else 'f')
    if not places:
        return text
    whole, _, decimals = text.partition('.')
    return f'{whole}.{decimals.rstrip("0").ljust(places, "0")}'


def csv_cell(value: Any) -> str:
    """One value as a CSV cell (see `print_csv`)."""
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, int | float | uuid.UUID):
        return str(value)
    text = str(value)
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text
