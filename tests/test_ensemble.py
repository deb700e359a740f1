import pytest
import torch

from napari_openseg.core.ensemble import EnsembleMean, area_matched, combine_members


def blob(centre_y: float, centre_x: float, radius: float = 4.0, size: int = 20) -> torch.Tensor:
    """A soft disc: probability 0.5 at ``radius`` from the centre, higher inside."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((y - centre_y) ** 2 + (x - centre_x) ** 2).sqrt()
    return torch.sigmoid(2 * (radius - distance))


def test_area_matched_keeps_the_n_most_probable_pixels_in_order():
    mean = torch.tensor([[0.1, 0.45, 0.3], [0.9, 0.2, 0.4]])
    remapped = area_matched(mean, torch.tensor(4.0))
    assert (remapped >= 0.5).sum() == 4
    assert set((remapped >= 0.5).flatten().nonzero().flatten().tolist()) == {1, 2, 3, 5}
    order = torch.argsort(mean.flatten())
    assert torch.all(remapped.flatten()[order].diff() > 0)  # strictly monotone: ranking unchanged
    assert remapped.min() >= 0 and remapped.max() <= 1


def test_area_matched_with_zero_area_leaves_every_pixel_below_the_threshold():
    mean = torch.tensor([[0.7, 0.2], [0.1, 0.6]])
    assert (area_matched(mean, torch.tensor(0.0), threshold=0.3) < 0.3).all()


def test_area_matched_works_per_image_and_honours_the_threshold():
    mean = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    area = torch.tensor([[0.0, 5.0, 64.0], [1.0, 10.4, 30.6]])
    remapped = area_matched(mean, area, threshold=0.3)
    assert remapped.shape == mean.shape
    assert (remapped >= 0.3).sum(dim=(-2, -1)).tolist() == [[0, 5, 64], [1, 10, 31]]


def test_two_shifted_members_keep_their_area_where_the_plain_mean_shrinks():
    left, right = blob(9.6, 8.1), blob(10.3, 11.7)
    plain = EnsembleMean(rule="mean")
    matched = EnsembleMean()
    for member in (left, right):
        plain.add(member)
        matched.add(member)
    assert torch.equal(plain.result(), (left + right) / 2)
    areas = [int((member >= 0.5).sum()) for member in (left, right)]
    area = round(sum(areas) / 2)
    overlap = (left >= 0.5) & (right >= 0.5)
    assert (plain.result() >= 0.5).sum() < min(areas)  # the plain mean shrinks the object
    kept = matched.result() >= 0.5
    assert kept.sum() == area
    assert kept[overlap].all()  # where both members agree is kept first


def test_one_member_is_returned_unchanged_and_no_member_is_an_error():
    member = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(1))
    single = EnsembleMean()
    single.add(member)
    assert torch.equal(single.result(), member)
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleMean().result()
    with pytest.raises(ValueError, match="ensemble rule"):
        EnsembleMean(rule="median")


def test_combine_members_of_a_stack_equals_adding_them_one_by_one():
    stack = torch.stack([blob(9.6, 8.1), blob(10.3, 11.7), blob(10.0, 9.0)])
    ensemble = EnsembleMean(0.4)
    for member in stack:
        ensemble.add(member)
    assert torch.equal(combine_members(stack, 0.4), ensemble.result())
    assert torch.equal(combine_members(stack, rule="mean"), stack.mean(0))
