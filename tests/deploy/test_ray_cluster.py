"""A Ray run on a two-raylet cluster (Ray's multi-node test cluster on one machine): one host
actor per raylet, the same run as the local engine."""

import pytest

ray = pytest.importorskip("ray")

from tests.deploy.test_ray_engine import assert_same_run  # noqa: E402
from tests.paradigms.test_engines import outcome, run  # noqa: E402


@pytest.mark.slow
def test_a_two_node_cluster_run_equals_the_local_run(tiny_config):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        sections = {"paradigm": {"name": "fedavg", "options": {"local_steps": 2}}}
        want = outcome(run(tiny_config, "cluster", "local", **sections))
        # One CPU per host: the scheduler must put the two hosts on different raylets.
        engine = {"ray": {"address": cluster.address, "hosts": 2, "num_cpus_per_host": 1}}
        got = outcome(run(tiny_config, "cluster", "ray", engine=engine, **sections))
        assert_same_run(got, want)
    finally:
        ray.shutdown()
        cluster.shutdown()
