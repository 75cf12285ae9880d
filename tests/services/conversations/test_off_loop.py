"""`pieces`: how a long conversation's messages are cut into calls of bounded size (`_off_loop`)."""

from __future__ import annotations

from agentrt.services.conversations._off_loop import pieces


def _cut(sizes: list[int], limit: int) -> list[list[int]]:
    return [sizes[piece] for piece in pieces(sizes, limit)]


def test_pieces_hold_at_most_the_limit_and_cover_every_item_once_in_order() -> None:
    sizes = [3, 4, 2, 9, 1, 1, 1, 5]
    cut = _cut(sizes, 8)
    assert cut == [[3, 4], [2], [9], [1, 1, 1, 5]]
    assert [size for piece in cut for size in piece] == sizes


def test_an_item_larger_than_the_limit_is_a_piece_alone_and_no_items_make_no_piece() -> None:
    assert _cut([100], 8) == [[100]]
    assert _cut([1, 100, 1], 8) == [[1], [100], [1]]
    assert _cut([], 8) == []
