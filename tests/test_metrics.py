"""Tests for vcfast.metrics.multigroup_accuracy."""

import json
import math

import pytest
import torch

from vcfast.labels import LabelSpace
from vcfast.metrics import multigroup_accuracy

# 3 samples, groups (3, 2).
LOGITS = torch.tensor(
    [
        # g0 (3 classes)   g1 (2 classes)
        [2.0, 0.1, 0.3, 0.0, 1.0],  # pred g0=0, g1=1
        [0.0, 0.2, 5.0, 3.0, -1.0],  # pred g0=2, g1=0
        [0.0, 1.0, 0.5, 0.2, 0.1],  # pred g0=1, g1=0
    ]
)
INDICES = torch.tensor(
    [
        [0, 0],  # g0 right, g1 wrong
        [2, -1],  # g0 right, g1 unknown
        [0, 0],  # g0 wrong, g1 right
    ]
)
ONEHOT = torch.tensor(
    [
        [1, 0, 0, 1, 0],
        [0, 0, 1, -1, -1],
        [1, 0, 0, 1, 0],
    ],
    dtype=torch.int8,
)


def test_hand_example_indices():
    r = multigroup_accuracy(LOGITS, INDICES, (3, 2))
    assert r["group0"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "count": 3}
    assert r["group1"] == {"accuracy": 0.5, "correct": 1, "count": 2}  # unknown excluded
    assert r["mean"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert set(r) == {"group0", "group1", "mean"}


def test_both_target_formats_agree():
    a = multigroup_accuracy(LOGITS, INDICES, (3, 2))
    b = multigroup_accuracy(LOGITS, ONEHOT, (3, 2))
    c = multigroup_accuracy(LOGITS, ONEHOT.float(), [3, 2])
    assert a == b == c


def test_random_formats_agree_with_labelspace():
    space = LabelSpace([("speaker", 11), ("accent", 4), ("sex", 2)])
    g = torch.Generator().manual_seed(0)
    n = 50
    idx = torch.stack([torch.randint(0, s, (n,), generator=g) for s in space.sizes], 1)
    idx = idx.masked_fill(torch.rand(n, 3, generator=g) < 0.3, -1)
    logits = torch.randn(n, space.n_classes, generator=g)
    r_idx = multigroup_accuracy(logits, idx, space)
    r_tgt = multigroup_accuracy(logits, space.classifier_target(idx), space)
    assert r_idx == r_tgt
    assert set(r_idx) == {"speaker", "accent", "sex", "mean"}
    pred = space.decode_prediction(logits)
    for k, name in enumerate(space.names):
        known = idx[:, k] >= 0
        assert r_idx[name]["count"] == int(known.sum())
        expect = (pred[known, k] == idx[known, k]).float().mean().item()
        assert r_idx[name]["accuracy"] == pytest.approx(expect)
    # a perfect classifier
    perfect = space.classifier_target(idx).float()
    r = multigroup_accuracy(perfect, idx, space)
    assert all(r[n]["accuracy"] == 1.0 for n in space.names) and r["mean"] == 1.0


def test_nan_when_none_known():
    idx = torch.tensor([[0, -1], [0, -1]])  # preds g0: 0, 2
    r = multigroup_accuracy(LOGITS[:2], idx, (3, 2))
    assert math.isnan(r["group1"]["accuracy"]) and r["group1"]["count"] == 0
    assert r["mean"] == r["group0"]["accuracy"] == 0.5  # nan group left out of the mean
    r = multigroup_accuracy(LOGITS[:2], torch.full((2, 2), -1), (3, 2))
    assert math.isnan(r["mean"])
    r = multigroup_accuracy(torch.zeros(0, 5), torch.zeros(0, 2, dtype=torch.long), (3, 2))
    assert math.isnan(r["mean"]) and r["group0"]["count"] == 0


def test_plain_python_types_and_json():
    r = multigroup_accuracy(LOGITS, INDICES, (3, 2))
    for name in ("group0", "group1"):
        assert type(r[name]["accuracy"]) is float
        assert type(r[name]["count"]) is int and type(r[name]["correct"]) is int
    assert type(r["mean"]) is float
    json.dumps(r)


def test_names_from_pairs_and_duck_typed_groups():
    class Sizes:
        sizes = (3, 2)

    r = multigroup_accuracy(LOGITS, INDICES, Sizes())
    assert set(r) == {"group0", "group1", "mean"}
    r = multigroup_accuracy(LOGITS, INDICES, [("spk", 3), ("sex", 2)])
    assert set(r) == {"spk", "sex", "mean"}


def test_no_grad():
    logits = LOGITS.clone().requires_grad_(True)
    r = multigroup_accuracy(logits, INDICES, (3, 2))
    assert r["group0"]["count"] == 3


def test_size_one_groups_both_forms():
    # C == G when every group has size 1: a known class is 0 as an index, 1 as a one-hot
    logits = torch.randn(4, 2)
    idx = torch.tensor([[0, -1], [-1, 0], [0, 0], [-1, -1]])
    onehot = LabelSpace([("a", 1), ("b", 1)]).classifier_target(idx)
    assert onehot.tolist() == [[1, -1], [-1, 1], [1, 1], [-1, -1]]
    expect = {"accuracy": 1.0, "correct": 2, "count": 2}
    for t in (idx, onehot):
        r = multigroup_accuracy(logits, t, (1, 1))
        assert r["group0"] == expect and r["group1"] == expect


def test_errors():
    with pytest.raises(ValueError, match=r"logits must have shape \[N, 5\]"):
        multigroup_accuracy(torch.zeros(3, 4), INDICES, (3, 2))
    with pytest.raises(ValueError, match="5 columns .* or 2"):
        multigroup_accuracy(LOGITS, torch.zeros(3, 3, dtype=torch.long), (3, 2))
    with pytest.raises(ValueError, match="targets must have shape"):
        multigroup_accuracy(LOGITS, INDICES[:2], (3, 2))
    with pytest.raises(ValueError, match="sample 1, group 'group1': index 2"):
        multigroup_accuracy(LOGITS, torch.tensor([[0, 0], [0, 2], [0, 0]]), (3, 2))
    bad = ONEHOT.clone()
    bad[0, 4] = 1  # two ones in group1 of sample 0
    with pytest.raises(ValueError, match="group 'group1' of sample 0"):
        multigroup_accuracy(LOGITS, bad, (3, 2))
    with pytest.raises(TypeError, match="integer dtype"):
        multigroup_accuracy(LOGITS, INDICES.float(), (3, 2))
    with pytest.raises(ValueError, match=">= 1"):
        multigroup_accuracy(LOGITS, INDICES, (5, 0))
    with pytest.raises(TypeError, match="groups must be"):
        multigroup_accuracy(LOGITS, INDICES, 5)
    with pytest.raises(ValueError, match="'mean'"):
        multigroup_accuracy(LOGITS, INDICES, [("mean", 3), ("x", 2)])
