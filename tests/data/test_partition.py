import pytest

from cotune.config import PartitionSection
from cotune.data import format_partition_table, partition, partition_summary
from cotune.errors import DataError

LABELS = [i % 5 for i in range(500)]


def _check_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(range(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_coverage_and_determinism(scheme):
    cfg = PartitionSection(scheme=scheme, min_size=2)
    parts = partition(LABELS, 8, cfg, seed=7)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 2
    _check_cover(parts, len(LABELS))
    assert parts == partition(LABELS, 8, cfg, seed=7)
    assert parts != partition(LABELS, 8, cfg, seed=8)


def test_skew_grows_as_alpha_falls():
    div = {}
    for alpha in (0.05, 1.0, 100.0):
        parts = partition(LABELS, 10, PartitionSection(scheme="dirichlet", alpha=alpha), seed=0)
        div[alpha] = partition_summary(parts, LABELS)["mean_divergence"]
    assert div[0.05] > div[1.0] > div[100.0]
    iid = partition_summary(partition(LABELS, 10, PartitionSection(), seed=0), LABELS)
    assert iid["mean_divergence"] < div[1.0]


def test_shards_limit_labels_per_device():
    parts = partition(LABELS, 10, PartitionSection(scheme="shards", classes_per_device=2), seed=0)
    assert all(len({LABELS[i] for i in p}) <= 2 for p in parts)


def test_quantity_sizes_are_skewed():
    parts = partition(LABELS, 10, PartitionSection(scheme="quantity", power=2.0), seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 5 * sizes[0]


def test_min_size_and_empty_partitions():
    with pytest.raises(DataError, match="at least 1 example"):
        partition([0, 1, 0], 5, PartitionSection(), seed=0)
    with pytest.raises(DataError, match="min_size"):
        partition(LABELS, 50, PartitionSection(scheme="dirichlet", alpha=0.01, min_size=9), seed=0)
    parts = partition(
        LABELS, 20, PartitionSection(scheme="dirichlet", alpha=0.3, min_size=10), seed=0
    )
    assert min(len(p) for p in parts) >= 10


def test_causal_lm_schemes():
    unlabeled = [None] * 100
    for scheme in ("iid", "quantity"):
        _check_cover(partition(unlabeled, 4, PartitionSection(scheme=scheme), seed=0), 100)
    for scheme in ("dirichlet", "shards"):
        with pytest.raises(DataError, match="needs class labels"):
            partition(unlabeled, 4, PartitionSection(scheme=scheme), seed=0)
    assert partition_summary([[0, 1], [2]], [None] * 3)["mean_divergence"] is None


def test_summary_and_table():
    parts = partition(LABELS, 30, PartitionSection(scheme="dirichlet", alpha=0.5), seed=0)
    s = partition_summary(parts, LABELS, ["a", "b", "c", "d", "e"])
    assert sum(s["sizes"]) == 500 and len(s["label_counts"]) == 30
    assert [sum(r) for r in s["label_counts"]] == s["sizes"]
    table = format_partition_table(s, max_rows=5)
    assert "10 more devices" not in table and "25 more devices" in table and "TV distance" in table
