"""Held-out activation recording: streaming top-k examples against brute force."""

from __future__ import annotations

import numpy as np
import torch

from universality.analysis.heldout import StreamingTopK


def test_streaming_topk_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(1000, 40, generator=gen) - 1.5)  # sparse, many ties at 0
    acts[:, 3] = 0  # a dead feature
    top = StreamingTopK(40, k=5)
    for chunk in acts.split(137):
        top.update(chunk)
    values, positions = top.result()
    expected_values, expected_positions = acts.topk(5, dim=0)
    np.testing.assert_array_equal(values, expected_values.T.numpy())
    fired = expected_values.T.numpy() > 0
    np.testing.assert_array_equal(positions[fired], expected_positions.T.numpy()[fired])
    assert (positions[~fired] == -1).all() and (positions[3] == -1).all()
    feature, rank = np.nonzero(fired)
    np.testing.assert_array_equal(acts.numpy()[positions[feature, rank], feature], values[feature, rank])
