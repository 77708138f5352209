"""Behaviour of the partitioners, the statistics and the heatmap."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpac_hf.partition import (
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    QuantitySkewPartitioner,
    get_partitioner,
    label_skew,
    partition_stats,
    plot_label_heatmap,
    read_column,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def labelled(labels, extra: bool = True) -> Dataset:
    labels = np.asarray(labels, dtype=np.int64)
    columns = {"label": labels}
    if extra:
        columns["row"] = np.arange(len(labels))
    return Dataset.from_dict(columns)


def balanced(num_classes: int = 10, per_class: int = 100, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return labelled(rng.permutation(np.repeat(np.arange(num_classes), per_class)))


def check_disjoint_sorted(parts: list[np.ndarray], n: int) -> np.ndarray:
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0, "no client may be empty"
        assert np.all(np.diff(part) > 0), "indices sorted and unique within a client"
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an example was given twice"
    assert joined.min() >= 0 and joined.max() < n
    return joined


def all_partitioners(num_clients: int, seed: int) -> list:
    return [
        IidPartitioner(num_clients, seed=seed),
        DirichletPartitioner(num_clients, alpha=0.5, seed=seed),
        DirichletPartitioner(num_clients, alpha=0.5, scheme="class", seed=seed),
        PathologicalPartitioner(num_clients, classes_per_client=2, seed=seed),
        QuantitySkewPartitioner(num_clients, alpha=1.0, seed=seed),
        QuantitySkewPartitioner(num_clients, power_law_exponent=1.2, seed=seed),
    ]


@FAST
@given(
    num_classes=st.integers(2, 8),
    per_class=st.integers(5, 40),
    num_clients=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_every_partitioner_is_disjoint_and_covers_what_it_promises(
    num_classes, per_class, num_clients, seed
):
    dataset = balanced(num_classes, per_class, seed)
    n = len(dataset)
    for partitioner in all_partitioners(num_clients, seed):
        try:
            parts = partitioner.assign(dataset)
        except ValueError as error:
            # Only the documented refusals are allowed (e.g. a pathological class
            # with fewer examples than holders, or an unlucky class-scheme draw).
            assert "no example" in str(error) or "could not give every client" in str(error)
            continue
        assert len(parts) == num_clients
        joined = check_disjoint_sorted(parts, n)
        if isinstance(partitioner, DirichletPartitioner) and partitioner.scheme == "client":
            # Equal sizes; the n % num_clients remainder belongs to nobody.
            assert {len(p) for p in parts} == {n // num_clients}
            assert len(joined) == n - n % num_clients
        elif isinstance(partitioner, PathologicalPartitioner) and num_clients * 2 < num_classes:
            assert len(joined) < n
        else:
            assert len(joined) == n


@FAST
@given(seed=st.integers(0, 2**31), num_clients=st.integers(3, 6))
def test_same_seed_same_partition_and_different_seed_differs(seed, num_clients):
    dataset = balanced(10, 40)
    for make in (
        lambda s: IidPartitioner(num_clients, seed=s),
        lambda s: DirichletPartitioner(num_clients, alpha=0.3, seed=s),
        lambda s: DirichletPartitioner(num_clients, alpha=1.0, scheme="class", seed=s),
        lambda s: PathologicalPartitioner(num_clients, classes_per_client=4, seed=s),
        lambda s: QuantitySkewPartitioner(num_clients, alpha=1.0, seed=s),
    ):
        first = make(seed).assign(dataset)
        again = make(seed).assign(dataset)
        other = make(seed + 1).assign(dataset)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_is_shuffled_not_contiguous_and_near_equal():
    dataset = balanced(10, 50)
    parts = IidPartitioner(7).assign(dataset)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not any(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)
    stats = partition_stats(parts, read_column(dataset, "label"))
    assert stats.skew < 0.2


def test_dirichlet_skew_small_alpha_far_above_large_alpha():
    dataset = balanced(10, 200)
    labels = read_column(dataset, "label")
    for scheme in ("client", "class"):
        skewed = partition_stats(
            DirichletPartitioner(20, alpha=0.05, scheme=scheme).assign(dataset), labels
        )
        near_iid = partition_stats(
            DirichletPartitioner(20, alpha=100, scheme=scheme).assign(dataset), labels
        )
        assert skewed.skew > 0.5, scheme
        assert near_iid.skew < 0.15, scheme
        assert skewed.skew > near_iid.skew + 0.4
        assert np.median(skewed.classes_per_client) <= 4


def test_dirichlet_client_scheme_follows_each_clients_proportions():
    # With plenty of examples per class and a few clients, a client's label mix
    # is its own Dirichlet draw: the top class dominates at small alpha.
    dataset = balanced(4, 2000)
    parts = DirichletPartitioner(4, alpha=0.05, seed=3).assign(dataset)
    stats = partition_stats(parts, read_column(dataset, "label"))
    top_share = stats.label_counts.max(axis=1) / stats.client_sizes
    assert np.median(top_share) > 0.8


def test_dirichlet_client_scheme_renormalises_over_classes_left():
    # Class 1 has only 10 examples: clients that want it get the rest from other classes
    # and every client is still full.
    labels = np.concatenate([np.zeros(190, dtype=np.int64), np.ones(10, dtype=np.int64)])
    dataset = labelled(labels)
    parts = DirichletPartitioner(10, alpha=1.0, seed=1).assign(dataset)
    assert [len(p) for p in parts] == [20] * 10
    check_disjoint_sorted(parts, 200)


def test_dirichlet_class_scheme_resamples_to_min_size_or_says_why():
    dataset = balanced(10, 100)
    parts = DirichletPartitioner(
        10, alpha=0.5, scheme="class", min_examples_per_client=30, seed=0
    ).assign(dataset)
    assert min(len(p) for p in parts) >= 30
    with pytest.raises(ValueError, match="min_examples_per_client=90.*max_tries=3"):
        DirichletPartitioner(
            10, alpha=0.05, scheme="class", min_examples_per_client=90, max_tries=3
        ).assign(dataset)


def test_pathological_gives_exactly_k_classes_and_splits_each_class_among_holders():
    dataset = balanced(10, 60)
    parts = PathologicalPartitioner(15, classes_per_client=2, seed=4).assign(dataset)
    labels = read_column(dataset, "label")
    stats = partition_stats(parts, labels)
    assert set(stats.classes_per_client) == {2}
    check_disjoint_sorted(parts, len(dataset))
    holders = (stats.label_counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1
    for k in range(10):
        shares = stats.label_counts[:, k][stats.label_counts[:, k] > 0]
        assert shares.max() - shares.min() <= 1


def test_quantity_skew_sizes_vary_labels_stay_iid():
    dataset = balanced(5, 400)
    parts = QuantitySkewPartitioner(10, alpha=0.3, min_examples_per_client=20).assign(dataset)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20
    assert sizes.max() > 3 * sizes.min()
    big = [p for p in parts if len(p) >= 200]
    assert partition_stats(big, read_column(dataset, "label")).skew < 0.15
    power = QuantitySkewPartitioner(10, power_law_exponent=2.0).client_sizes(2000)
    assert power.sum() == 2000 and np.sort(power)[-1] > 10 * np.sort(power)[0]


def test_natural_id_groups_by_value_in_sorted_order():
    speakers = ["b", "a", "c", "a", "b", "a"]
    dataset = Dataset.from_dict({"speaker": speakers, "text": list("uvwxyz")})
    partitioner = NaturalIdPartitioner("speaker")
    parts = partitioner.assign(dataset)
    assert partitioner.client_ids == ["a", "b", "c"]
    assert partitioner.num_clients == 3
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]
    views = partitioner.split(dataset)
    assert [set(list(v["speaker"])) for v in views] == [{"a"}, {"b"}, {"c"}]
    assert list(views[0]["text"]) == ["v", "x", "z"]


def test_natural_id_on_a_selected_view_and_integer_ids():
    dataset = Dataset.from_dict({"writer": [5, 3, 5, 9, 3, 3], "x": list(range(6))})
    view = dataset.select([5, 4, 3, 0])
    partitioner = NaturalIdPartitioner("writer")
    parts = partitioner.assign(view)
    assert partitioner.client_ids == [3, 5, 9]
    assert [p.tolist() for p in parts] == [[0, 1], [3], [2]]


def test_split_is_index_backed_and_matches_assign():
    dataset = balanced(3, 20)
    partitioner = DirichletPartitioner(4, alpha=1.0, seed=2)
    parts = partitioner.assign(dataset)
    views = partitioner.split(dataset)
    for indices, view in zip(parts, views, strict=True):
        # Same Arrow buffer as the full dataset, rows picked through an indices mapping.
        original = dataset.data.column("row").chunk(0).buffers()[1]
        shared = view.data.column("row").chunk(0).buffers()[1]
        assert shared.address == original.address
        assert len(view.data) == len(dataset)
        assert list(view["row"]) == indices.tolist()


def test_labels_read_through_a_select_or_shuffle_view():
    dataset = balanced(4, 25)
    view = dataset.shuffle(seed=1).select(range(50))
    expected = np.array(list(view["label"]))
    assert np.array_equal(read_column(view, "label"), expected)
    parts = PathologicalPartitioner(4, classes_per_client=1, seed=0).assign(view)
    for part in parts:
        assert len(set(expected[part].tolist())) == 1


def test_string_and_classlabel_labels():
    features = Features({"label": ClassLabel(names=["cat", "dog", "eel"]), "t": Value("int64")})
    dataset = Dataset.from_dict({"label": [0, 1, 2] * 10, "t": list(range(30))}, features=features)
    parts = PathologicalPartitioner(3, 1).assign(dataset)
    assert sorted(len(p) for p in parts) == [10, 10, 10]
    words = Dataset.from_dict({"tag": ["x", "y"] * 20})
    parts = DirichletPartitioner(4, alpha=0.5, label_column="tag").assign(words)
    stats = partition_stats(parts, read_column(words, "tag"))
    assert stats.classes.tolist() == ["x", "y"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan"), float("inf")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        DirichletPartitioner(10, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        QuantitySkewPartitioner(10, alpha=alpha)


def test_more_clients_than_examples_is_refused():
    dataset = balanced(2, 5)
    for partitioner in all_partitioners(11, 0):
        with pytest.raises(ValueError, match="num_clients=11 is too many for 10 examples"):
            partitioner.assign(dataset)


def test_missing_label_column_lists_the_available_ones():
    dataset = balanced(2, 5)
    with pytest.raises(ValueError, match=r"label_column='target'.*\['label', 'row'\]"):
        DirichletPartitioner(2, alpha=1.0, label_column="target").assign(dataset)
    with pytest.raises(ValueError, match=r"column='speaker'.*available columns"):
        NaturalIdPartitioner("speaker").assign(dataset)


def test_too_many_classes_per_client_is_refused():
    with pytest.raises(ValueError, match="classes_per_client=4 exceeds the 3 classes"):
        PathologicalPartitioner(3, classes_per_client=4).assign(balanced(3, 10))
    with pytest.raises(ValueError, match="classes_per_client must be an integer >= 1"):
        PathologicalPartitioner(3, classes_per_client=0)


def test_a_client_left_without_example_is_an_error_not_a_silent_empty_client():
    # Class 0 has one example but two holders: one of them would get nothing.
    dataset = labelled([0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="1 of 4 clients would get no example"):
        PathologicalPartitioner(4, classes_per_client=1).assign(dataset)
    with pytest.raises(ValueError, match="min_examples_per_client must be an integer >= 1"):
        DirichletPartitioner(4, alpha=1.0, min_examples_per_client=0)
    with pytest.raises(ValueError, match="too many for 20 examples with min_examples_per_client=6"):
        DirichletPartitioner(4, alpha=1.0, min_examples_per_client=6).assign(balanced(2, 10))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="num_clients must be a positive integer"):
        IidPartitioner(0)
    with pytest.raises(ValueError, match="scheme must be 'client'"):
        DirichletPartitioner(3, alpha=1.0, scheme="clients")
    with pytest.raises(ValueError, match="exactly one of alpha"):
        QuantitySkewPartitioner(3)
    with pytest.raises(ValueError, match="missing values"):
        NaturalIdPartitioner("s").assign(Dataset.from_dict({"s": ["a", None]}))


def test_registry_builds_by_name_and_refuses_unknown_names():
    assert set(PARTITIONERS) == {"iid", "dirichlet", "pathological", "quantity_skew", "natural_id"}
    partitioner = get_partitioner("quantity-skew", num_clients=3, alpha=0.5)
    assert isinstance(partitioner, QuantitySkewPartitioner)
    assert isinstance(get_partitioner("dirichlet", num_clients=3, alpha=1.0), DirichletPartitioner)
    with pytest.raises(ValueError, match="unknown partitioner 'shards'.*dirichlet"):
        get_partitioner("shards", num_clients=3)
    with pytest.raises(ValueError, match="partitioner 'iid'.*alpha"):
        get_partitioner("iid", num_clients=3, alpha=0.1)


# ---------------------------------------------------------------- statistics


def test_stats_counts_matrix_and_skew_bounds():
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    stats = partition_stats(parts, labels)
    assert stats.label_counts.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert stats.client_sizes.tolist() == [2, 2, 2]
    assert stats.skew == pytest.approx(2 / 3)
    same = partition_stats([np.array([0, 2, 4]), np.array([1, 3, 5])], labels)
    assert same.skew == pytest.approx(0.0)
    padded = partition_stats(parts, labels, num_classes=5)
    assert padded.label_counts.shape == (3, 5)
    with pytest.raises(ValueError, match="num_classes=2"):
        partition_stats(parts, labels, num_classes=2)


@FAST
@given(st.lists(st.lists(st.integers(0, 20), min_size=4, max_size=4), min_size=1, max_size=8))
def test_skew_is_always_in_unit_interval(rows):
    assert 0.0 <= label_skew(np.array(rows)) <= 1.0


def test_stats_from_client_datasets_and_table_text():
    dataset = balanced(10, 30)
    views = DirichletPartitioner(12, alpha=0.1).split(dataset)
    stats = partition_stats(views, "label")
    direct = partition_stats(
        DirichletPartitioner(12, alpha=0.1).assign(dataset), read_column(dataset, "label")
    )
    assert np.array_equal(stats.label_counts, direct.label_counts)
    text = stats.table(max_clients=3)
    assert "clients             12" in text
    assert "client size         min 25 / median 25 / max 25" in text
    assert f"{stats.skew:.3f}" in text
    assert "(9 more clients)" in text
    assert str(stats).startswith("clients")


def test_heatmap_is_a_png_for_100_clients(tmp_path):
    dataset = balanced(10, 100)
    stats = partition_stats(
        DirichletPartitioner(100, alpha=0.1).assign(dataset), read_column(dataset, "label")
    )
    path = plot_label_heatmap(stats, tmp_path / "sub" / "heat.png")
    data = (tmp_path / "sub" / "heat.png").read_bytes()
    assert path.endswith("heat.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    with Image.open(tmp_path / "sub" / "heat.png") as image:
        width, height = image.size
    assert width > height > 200
