"""Tests for vcfast.labels (docs/labels.md: label vectors, target sampling)."""

import json

import numpy as np
import pytest
import torch

from vcfast.labels import DEFAULT_GROUPS, LabelSpace, derangement

SMALL = [("speaker", 5), ("accent", 3), ("sex", 2)]


def random_partial(space, n, seed=0, p_unknown=0.35):
    """Random [N, G] indices with unknowns, rows 0 and 1 entirely unknown / entirely known."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, s, (n,), generator=g) for s in space.sizes]
    idx = torch.stack(cols, dim=1)
    unknown = torch.rand(n, space.n_groups, generator=g) < p_unknown
    unknown[0] = True
    unknown[1] = False
    return idx.masked_fill(unknown, -1)


def as_dicts(space, idx):
    return [{n: v for n, v in zip(space.names, row) if v >= 0} for row in idx.tolist()]


def as_tuples(idx):
    return [tuple(None if v < 0 else v for v in row) for row in idx.tolist()]


# ---------------------------------------------------------------------- construction


def test_default_dims():
    space = LabelSpace()
    assert space.names == ("speaker", "birthplace", "sex")
    assert space.sizes == (1421, 53, 2)
    assert space.n_groups == 3 and len(space) == 3
    assert space.n_classes == 1476
    assert space.input_dim == 1479
    assert space.offsets == (0, 1421, 1474)
    assert LabelSpace(DEFAULT_GROUPS) == space
    idx = torch.tensor([[0, -1, 1]])
    assert space.generator_input(idx).shape == (1, 1479)
    assert space.classifier_target(idx).shape == (1, 1476)


def test_sizes_are_plain_ints_tuple():
    space = LabelSpace([("a", np.int64(4)), ("b", 2)])
    assert space.sizes == (4, 2) and all(type(s) is int for s in space.sizes)


def test_from_names_and_lookup():
    space = LabelSpace.from_names(
        {"speaker": ["p225", "p226", "p227"], "accent": ["English", "Scottish"], "sex": ["F", "M"]}
    )
    assert space.names == ("speaker", "accent", "sex")
    assert space.sizes == (3, 2, 2)
    assert space.class_names("speaker") == ("p225", "p226", "p227")
    assert space.index_of("speaker", "p226") == 1
    assert space.index_of("sex", "M") == 1
    assert space.index_of(2, "F") == 0
    assert space.name_of("accent", 1) == "Scottish"
    with pytest.raises(ValueError, match=r"unknown speaker 'p999'.*'p225'"):
        space.index_of("speaker", "p999")
    with pytest.raises(ValueError, match="unknown label group 'age'"):
        space.index_of("age", "x")
    # names usable in label input
    idx = space.encode_indices([{"speaker": "p227", "sex": "F"}, ("p225", "Scottish", None)])
    assert idx.tolist() == [[2, -1, 0], [0, 1, -1]]
    with pytest.raises(ValueError, match="sample 1, group 'speaker'.*p999"):
        space.encode_indices([{"speaker": "p225"}, {"speaker": "p999"}])
    assert space.to_dicts(idx) == [
        {"speaker": "p227", "accent": None, "sex": "F"},
        {"speaker": "p225", "accent": "Scottish", "sex": None},
    ]


def test_group_without_names():
    space = LabelSpace(SMALL, class_names={"sex": ["F", "M"]})
    assert space.class_names("speaker") is None
    assert space.class_names("sex") == ("F", "M")
    assert space.index_of("speaker", 4) == 4
    assert space.index_of("speaker", "3") == 3
    with pytest.raises(ValueError, match="no class names"):
        space.index_of("speaker", "bob")
    with pytest.raises(ValueError, match="out of range"):
        space.index_of("speaker", 5)


def test_repr_eq_hash_dict_roundtrip():
    space = LabelSpace.from_names({"speaker": ["a", "b"], "sex": ["F", "M"]})
    assert repr(space) == "LabelSpace(speaker=2, sex=2, named=['speaker', 'sex'])"
    assert repr(LabelSpace()) == "LabelSpace(speaker=1421, birthplace=53, sex=2)"
    d = json.loads(json.dumps(space.to_dict()))
    back = LabelSpace.from_dict(d)
    assert back == space and hash(back) == hash(space)
    assert back.class_names("speaker") == ("a", "b")
    plain = LabelSpace(SMALL)
    assert LabelSpace.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    assert plain != LabelSpace([("speaker", 5), ("accent", 3), ("gender", 2)])
    assert LabelSpace([("speaker", 2), ("sex", 2)]) != space  # names matter
    assert space != "not a space"


@pytest.mark.parametrize(
    "groups, exc, match",
    [
        ([], ValueError, "empty"),
        ([("a", 2), ("a", 3)], ValueError, "duplicate group name 'a'"),
        ([("a", 0)], ValueError, "'a' must be >= 1"),
        ([("a", -2)], ValueError, ">= 1"),
        ([("", 2)], ValueError, "non-empty"),
        ([("a", 2.5)], TypeError, "must be an int"),
        ([("a", True)], TypeError, "must be an int"),
        ([("a", 2, 3)], TypeError, "pair"),
        ("speaker", TypeError, "sequence"),
    ],
)
def test_bad_groups(groups, exc, match):
    with pytest.raises(exc, match=match):
        LabelSpace(groups)


def test_bad_class_names():
    with pytest.raises(ValueError, match="size 2 but 3 class names"):
        LabelSpace([("sex", 2)], class_names={"sex": ["F", "M", "X"]})
    with pytest.raises(ValueError, match="duplicate class name 'F'"):
        LabelSpace.from_names({"sex": ["F", "F"]})
    with pytest.raises(ValueError, match="unknown group 'age'"):
        LabelSpace([("sex", 2)], class_names={"age": ["a", "b"]})
    with pytest.raises(ValueError, match="empty"):
        LabelSpace.from_names({})
    with pytest.raises(ValueError, match=">= 1"):
        LabelSpace.from_names({"sex": []})


# ---------------------------------------------------------------------- encoding


def test_hand_example_small():
    space = LabelSpace(SMALL)
    labels = [{"speaker": 2, "sex": 1}, (None, 0, None)]
    gin = space.generator_input(labels)
    expect = torch.zeros(2, 13)
    expect[0, 2] = 1  # speaker 2
    expect[0, 5 + 3 + 1] = 1  # sex 1
    expect[0, 10] = 1  # speaker known
    expect[0, 12] = 1  # sex known
    expect[1, 5] = 1  # accent 0
    expect[1, 11] = 1  # accent known
    torch.testing.assert_close(gin, expect)
    tgt = space.classifier_target(labels)
    assert tgt.dtype == torch.int8
    assert tgt.tolist() == [
        [0, 0, 1, 0, 0, -1, -1, -1, 0, 1],
        [-1, -1, -1, -1, -1, 1, 0, 0, -1, -1],
    ]


@pytest.mark.parametrize("groups", [SMALL, DEFAULT_GROUPS, [("only", 1)], [("a", 1), ("b", 7)]])
def test_roundtrips(groups):
    space = LabelSpace(groups)
    idx = random_partial(space, 33, seed=len(groups))
    gin = space.generator_input(idx)
    assert gin.shape == (33, space.input_dim) and gin.dtype == torch.float32
    assert set(gin.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(space.decode_generator_input(gin), idx)
    assert torch.equal(space.decode_generator_input(gin, strict=False), idx)
    tgt = space.classifier_target(idx)
    assert tgt.shape == (33, space.n_classes) and tgt.dtype == torch.int8
    assert torch.equal(space.decode_target(tgt), idx)
    # row 0 is all unknown
    assert gin[0].sum() == 0 and bool((tgt[0] == -1).all())
    # float targets too
    assert torch.equal(space.decode_target(space.classifier_target(idx, dtype=torch.float32)), idx)
    # the one-hot part of the generator input equals the non-negative part of the target
    torch.testing.assert_close(gin[:, : space.n_classes], tgt.clamp(min=0).float())
    assert torch.equal(gin[:, space.n_classes:], (idx >= 0).float())


def test_dict_tuple_tensor_numpy_agree():
    space = LabelSpace(SMALL)
    idx = random_partial(space, 20, seed=3)
    forms = [
        idx,
        idx.to(torch.int32),
        idx.numpy(),
        as_dicts(space, idx),
        as_tuples(idx),
        [list(r) for r in idx.tolist()],  # -1 in a list also means unknown
        [{**d, **{n: None for n in space.names if n not in d}} for d in as_dicts(space, idx)],
    ]
    for f in forms:
        assert torch.equal(space.encode_indices(f), idx)
        assert torch.equal(space.generator_input(f), space.generator_input(idx))
        assert torch.equal(space.classifier_target(f), space.classifier_target(idx))


def test_encode_does_not_alias_input():
    space = LabelSpace(SMALL)
    idx = random_partial(space, 4)
    out = space.encode_indices(idx)
    out.fill_(0)
    assert (idx != 0).any()


def test_empty_batch():
    space = LabelSpace(SMALL)
    assert space.encode_indices([]).shape == (0, 3)
    assert space.generator_input([]).shape == (0, 13)
    assert space.classifier_target(torch.empty(0, 3, dtype=torch.long)).shape == (0, 10)
    assert space.decode_target(torch.empty(0, 10)).shape == (0, 3)
    assert space.sample_targets(torch.empty(0, 3, dtype=torch.long)).shape == (0, 3)
    assert space.sample_targets([], strategy="uniform").shape == (0, 3)


def test_dtypes():
    space = LabelSpace(SMALL)
    idx = random_partial(space, 5)
    assert space.generator_input(idx, dtype=torch.bfloat16).dtype == torch.bfloat16
    t = space.classifier_target(idx, dtype=torch.float16)
    assert t.dtype == torch.float16 and set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    with pytest.raises(TypeError, match="signed"):
        space.classifier_target(idx, dtype=torch.uint8)
    with pytest.raises(TypeError, match="signed"):
        space.classifier_target(idx, dtype=torch.bool)


def test_encode_errors():
    space = LabelSpace(SMALL)
    with pytest.raises(ValueError, match=r"sample 1, group 'accent': value 3 out of range"):
        space.encode_indices(torch.tensor([[0, 0, 0], [1, 3, 1]]))
    with pytest.raises(ValueError, match=r"sample 0, group 'sex': value -2"):
        space.encode_indices(torch.tensor([[0, 0, -2]]))
    with pytest.raises(ValueError, match=r"sample 1, group 'speaker': value 9"):
        space.encode_indices([(0, 0, 0), (9, None, None)])
    with pytest.raises(ValueError, match=r"sample 0 has 2 entries, expected 3"):
        space.encode_indices([(0, 0)])
    with pytest.raises(ValueError, match=r"unknown group 'age'"):
        space.encode_indices([{"age": 3}])
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        space.encode_indices(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        space.encode_indices(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype"):
        space.encode_indices(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="single dict"):
        space.encode_indices({"speaker": 1})
    with pytest.raises(TypeError, match="bool"):
        space.encode_indices([(True, None, None)])
    with pytest.raises(TypeError, match="sample 0 must be"):
        space.encode_indices([5])
    with pytest.raises(ValueError, match="no class names"):
        space.encode_indices([("bob", None, None)])


# ---------------------------------------------------------------------- decoding


def test_decode_prediction_and_split():
    space = LabelSpace(SMALL)
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    pred = space.decode_prediction(logits)
    parts = space.split(logits)
    assert [p.shape[1] for p in parts] == [5, 3, 2]
    assert parts[1].data_ptr() == logits[:, 5:8].data_ptr()  # views, no copy
    for k, p in enumerate(parts):
        assert torch.equal(pred[:, k], p.argmax(1))
    # decode_prediction of a target's non-negative part gives the known classes
    idx = random_partial(space, 6)
    known = idx >= 0
    dp = space.decode_prediction(space.classifier_target(idx).float())
    assert torch.equal(dp[known], idx[known])
    # split along another dim / of a 3-D tensor
    assert [p.shape for p in space.split(torch.zeros(2, 10, 4), dim=1)] == [
        (2, 5, 4), (2, 3, 4), (2, 2, 4)
    ]


def test_decode_errors():
    space = LabelSpace(SMALL)
    with pytest.raises(ValueError, match=r"expected shape \[N, 10\]"):
        space.decode_target(torch.zeros(2, 13))
    with pytest.raises(ValueError, match=r"expected shape \[N, 10\]"):
        space.decode_prediction(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"expected shape \[N, 13\]"):
        space.decode_generator_input(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="generator input"):
        space.split(torch.zeros(2, 13))
    good = space.classifier_target([(1, 2, 0)])
    bad = good.clone()
    bad[0, 0] = 1  # two ones in speaker (class 1 is already set)
    with pytest.raises(ValueError, match="group 'speaker' of sample 0"):
        space.decode_target(bad)
    bad = good.clone()
    bad[0, 8] = -1  # half-unknown sex
    with pytest.raises(ValueError, match="group 'sex' of sample 0"):
        space.decode_target(bad)
    bad = good.clone()
    bad[0, 5:8] = 0  # known group with no one
    with pytest.raises(ValueError, match="group 'accent'"):
        space.decode_target(bad)
    gin = space.generator_input([(1, None, 0)])
    bad = gin.clone()
    bad[0, 11] = 1  # accent flagged known, one-hot all zero
    with pytest.raises(ValueError, match="group 'accent' of sample 0 is known"):
        space.decode_generator_input(bad)
    bad = gin.clone()
    bad[0, 6] = 1  # accent flagged unknown but has a one
    with pytest.raises(ValueError, match="group 'accent' of sample 0 is unknown"):
        space.decode_generator_input(bad)
    bad = gin.clone()
    bad[0, 10] = 0.5
    with pytest.raises(ValueError, match="flag of group 'speaker'"):
        space.decode_generator_input(bad)
    # soft vectors are readable when not strict
    soft = gin.clone()
    soft[0, :5] = torch.tensor([0.1, 0.6, 0.2, 0.05, 0.05])
    assert space.decode_generator_input(soft, strict=False).tolist() == [[1, -1, 0]]


# ---------------------------------------------------------------------- target sampling


@pytest.mark.parametrize("n", [2, 3, 7, 30])
def test_shuffle_is_derangement(n):
    space = LabelSpace(SMALL)
    # distinct rows (5 * 3 * 2 = 30 combinations), so a row can be traced back to its sample
    ar = torch.arange(n)
    idx = torch.stack([ar % 5, (ar // 5) % 3, (ar // 15) % 2], dim=1)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        tgt, perm = space.sample_targets(idx, generator=g, return_perm=True)
        assert tgt.shape == idx.shape and tgt.dtype == torch.long
        assert sorted(perm.tolist()) == list(range(n))
        assert not bool((perm == torch.arange(n)).any())
        assert torch.equal(tgt, idx[perm])
        # every target is a row of the input and no row is its own source
        assert not bool((tgt == idx).all(dim=1).any())


def test_shuffle_keeps_unknowns_and_rows():
    space = LabelSpace()
    idx = random_partial(space, 16, seed=5)
    tgt = space.sample_targets(idx, generator=torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in idx.tolist()}
    assert all(tuple(r) in rows for r in tgt.tolist())
    assert (tgt == -1).sum() == (idx == -1).sum()


def test_shuffle_single_sample_unchanged():
    space = LabelSpace(SMALL)
    idx = torch.tensor([[3, -1, 1]])
    tgt, perm = space.sample_targets(idx, return_perm=True)
    assert torch.equal(tgt, idx) and perm.tolist() == [0]


def test_sampling_determinism():
    space = LabelSpace()
    idx = random_partial(space, 32, seed=2)
    for strategy in ("shuffle", "uniform"):
        a = space.sample_targets(idx, generator=torch.Generator().manual_seed(7), strategy=strategy)
        b = space.sample_targets(idx, generator=torch.Generator().manual_seed(7), strategy=strategy)
        c = space.sample_targets(idx, generator=torch.Generator().manual_seed(8), strategy=strategy)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_uniform_strategy_in_range():
    space = LabelSpace([("a", 1), ("b", 4), ("c", 1000)])
    idx = torch.full((500, 3), -1)
    tgt, perm = space.sample_targets(
        idx, generator=torch.Generator().manual_seed(0), strategy="uniform", return_perm=True
    )
    assert perm is None
    assert tgt.shape == (500, 3) and tgt.dtype == torch.long
    assert bool((tgt >= 0).all())
    assert bool((tgt < torch.tensor(space.sizes)).all())
    assert set(tgt[:, 1].tolist()) == {0, 1, 2, 3}
    # result is valid label input
    assert torch.equal(space.decode_target(space.classifier_target(tgt)), tgt)


def test_sampling_accepts_list_input_and_bad_strategy():
    space = LabelSpace(SMALL)
    tgt = space.sample_targets([(0, 0, 0), (1, 1, 1)], generator=torch.Generator().manual_seed(0))
    assert tgt.tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="strategy"):
        space.sample_targets([(0, 0, 0)], strategy="random")


def test_derangement_uniform_over_n3():
    # n = 3 has exactly two derangements; both must appear
    g = torch.Generator().manual_seed(0)
    seen = {tuple(derangement(3, generator=g).tolist()) for _ in range(50)}
    assert seen == {(1, 2, 0), (2, 0, 1)}
    assert derangement(0).shape == (0,)
    assert derangement(1).tolist() == [0]
