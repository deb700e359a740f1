"""Confidence measures of a slice's prediction, on probabilities and masks whose values are known."""

from __future__ import annotations

import pytest
import torch

from napari_openseg.core.propagate import confidence
from napari_openseg.core.propagate.confidence import combine, consistency, draw_measures
from tests._blobs import GRID, blob_images, one_thread, train_blob_net

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_sharp_agreed_predictions_score_one():
    sure = torch.zeros(2, 8, 8)
    sure[:, 2:6, 2:6] = 1.0
    assert draw_measures(sure) == {"sharpness": 1.0, "agreement": 1.0}
    assert draw_measures(torch.zeros(3, 4, 4)) == {"sharpness": 1.0, "agreement": 1.0}  # agreed: nothing


def test_disagreeing_and_unsure_draws_score_lower():
    probs = torch.zeros(2, 8, 8)
    probs[:, 2:6, 2:6] = 1.0
    probs[1, 4:6] = 0.0  # draw 2 finds only the top half of draw 1's 4x4 square
    measures = draw_measures(probs)
    # Masks of 16 and 8 px overlapping on 8: Dice 2 * 8 / 24 = 2/3.
    assert measures["agreement"] == pytest.approx(2 / 3)
    # Mean probability 1 on 8 px and .5 on 8 px; its mask (> .5) is the 8 sure px:
    # soft Dice = 2 * 8 / (12 + 8) = .8.
    assert measures["sharpness"] == pytest.approx(0.8)
    # Nothing drawn: the background is scored as a mask would be. All 0.3 is as sharp as a mask of
    # all-0.7 pixels, 2 * .7 / 1.7; a clear "nothing here" (0.01) scores near 1, not 0 as it once did.
    one = draw_measures(torch.full((1, 4, 4), 0.3))
    assert one["sharpness"] == pytest.approx(2 * 0.7 / 1.7) and one["agreement"] == 1.0
    assert draw_measures(torch.full((1, 4, 4), 0.7))["sharpness"] == pytest.approx(2 * 0.7 / 1.7)
    assert draw_measures(torch.full((2, 4, 4), 0.01))["sharpness"] == pytest.approx(2 * 0.99 / 1.99)
    with pytest.raises(ValueError, match="K g g"):
        draw_measures(torch.zeros(4, 4))


def test_combine_multiplies_the_chosen_terms(monkeypatch):
    measures = {"sharpness": 0.9, "agreement": 0.5, "consistency": 0.8}
    assert combine(measures) == pytest.approx(0.9 * 0.5 * 0.8)
    monkeypatch.setattr(confidence, "CONFIDENCE_TERMS", ("sharpness",))
    assert combine(measures) == pytest.approx(0.9)


def test_consistency_rewards_a_faithful_mask_and_catches_a_wrong_one():
    net = train_blob_net()
    images, masks = blob_images(2, torch.Generator().manual_seed(5))
    candidate, candidate_mask = images[0, 0], masks[0, 0]
    reference, reference_mask = images[1, 0], masks[1, 0]
    good = consistency(net, candidate, candidate_mask, reference, reference_mask)
    wrong = torch.zeros(GRID, GRID)
    wrong[:8, :8] = 1.0  # a confident mask of the wrong place: background only
    bad = consistency(net, candidate, wrong, reference, reference_mask)
    assert good > 0.8 and bad < good - 0.3  # measured: .97 and .47
    assert consistency(net, candidate, torch.zeros(GRID, GRID), reference, reference_mask) == 1.0
