"""Views of a rank's pieces: one split per tensor gives exactly the views a narrow per range would."""
import pytest
import torch

from ds_structopt.distributed.pieces import GradViews, Piece, split_ranges


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride())


@pytest.mark.parametrize("ranges", [
    [(0, 10)],                         # the whole tensor
    [(3, 4)],                          # one range inside
    [(7, 3), (0, 2), (2, 5)],          # tiling, given out of order
    [(1, 2), (5, 1), (8, 2)],          # gaps before, between and after
    [(4, 0), (4, 3), (0, 4)],          # an empty range at another's start
])
def test_split_ranges_gives_the_narrow_views(ranges):
    t = torch.arange(10.0)
    views = split_ranges(t, ranges)
    assert set(views) == set(ranges)
    for start, numel in ranges:
        assert _same_view(views[(start, numel)], t.narrow(0, start, numel))


def test_split_ranges_falls_back_to_narrow_for_overlapping_ranges():
    t = torch.arange(10.0)
    views = split_ranges(t, [(0, 6), (4, 4)])
    assert _same_view(views[(0, 6)], t.narrow(0, 0, 6)) and _same_view(views[(4, 4)], t.narrow(0, 4, 4))


def test_grad_views_match_each_pieces_own_gradient_and_follow_a_new_gradient():
    flat = torch.zeros(12)
    other = torch.zeros(2, 3)
    pieces = [Piece(0, 5, flat.narrow(0, 2, 5), flat, 2), Piece(4, 3, flat.narrow(0, 9, 3), flat, 9),
              Piece(0, 6, other.view(-1), other, 0)]
    flat.grad = torch.arange(12.0)
    other.grad = None
    views = GradViews(pieces)
    assert _same_view(views.of(pieces[0]), pieces[0].grad()) and _same_view(views.of(pieces[1]), pieces[1].grad())
    assert views.of(pieces[2]) is None
    # a piece made after the views (layouts re-attached) gets its own gradient, not a stale one
    late = Piece(0, 2, flat.narrow(0, 0, 2), flat, 0)
    assert _same_view(views.of(late), flat.grad.narrow(0, 0, 2))
