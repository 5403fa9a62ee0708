"""train.device / train.node_devices: resolution, errors, and where tensors end up."""

import pytest
import torch

from cotune.accel import placement
from cotune.accel.placement import check_placement, node_device, node_kind, resolve_device
from cotune.config import RunConfig, config_from_dict
from cotune.errors import ConfigError
from cotune.train import RoleState, Trainer


def test_auto_picks_the_best_available_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu" and placement.available("mps"):
        want = "mps"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_missing_cuda_is_a_clear_error_naming_the_field():
    with pytest.raises(
        ConfigError, match=r"train.device: 'cuda' is not available .*use auto or cpu"
    ):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"train.node_devices.server: 'cuda:1'"):
        resolve_device("cuda:1", "train.node_devices.server")


def test_bad_device_names_fail_at_config_load(tmp_path):
    with pytest.raises(ConfigError, match=r"train.device.*'gpu' is not a device"):
        config_from_dict({"train": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"train.node_devices.*'sever' is not a node kind"):
        config_from_dict({"train": {"node_devices": {"sever": "cpu"}}})
    with pytest.raises(ConfigError, match=r"train.node_devices.*server: 'cuda0'"):
        config_from_dict({"train": {"node_devices": {"server": "cuda0"}}})


def test_node_overrides_go_id_then_kind_then_default(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    cfg = RunConfig.model_validate(
        {
            "train": {
                "device": "cpu",
                "node_devices": {"server": "cuda:1", "devices": "cuda", "device-3": "cpu"},
            }
        }
    )
    assert node_kind("server") == "server" and node_kind("device-0") == "devices"
    assert node_kind("edge-1") == "edges"
    assert node_device(cfg.train, "server") == torch.device("cuda", 1)
    assert node_device(cfg.train, "device-0") == torch.device("cuda", 0)
    assert node_device(cfg.train, "device-3") == torch.device("cpu")
    assert node_device(cfg.train, "edge-0") == torch.device("cpu")


def fake_cuda(monkeypatch, count):
    """Pretend this machine has ``count`` CUDA devices (resolution only: nothing runs there)."""
    real = placement.available
    monkeypatch.setattr(placement, "available", lambda k: k == "cuda" or real(k))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_local_engine_needs_one_device_for_every_role(monkeypatch):
    fake_cuda(monkeypatch, count=1)
    nodes = ["server", "device-0", "device-1"]
    split = {"device": "cpu", "node_devices": {"server": "cuda"}}
    local = RunConfig.model_validate({"train": split})
    with pytest.raises(ConfigError, match="local engine runs every role on one shared model"):
        check_placement(local, nodes)
    isolated = RunConfig.model_validate({"train": split, "engine": {"kind": "isolated"}})
    assert check_placement(isolated, nodes) == torch.device("cuda", 0)
    unknown = RunConfig.model_validate({"train": {"node_devices": {"device-7": "cpu"}}})
    with pytest.raises(ConfigError, match="no node 'device-7' in this run"):
        check_placement(unknown, nodes)


def test_trainer_places_a_state_it_activates_and_keeps_cuda_rng_only_on_gpus():
    p = torch.nn.Parameter(torch.zeros(3))
    trainer = Trainer({"w": p}, RunConfig().train, 10)
    st = trainer.new_state(seed=1)
    assert st.cuda_rng is None and trainer.device == p.device
    # A checkpoint written before the GPU fields existed still loads.
    old = {k: v for k, v in st.state_dict().items() if k not in ("cuda_rng", "scaler")}
    back = RoleState.from_state_dict(old)
    assert back.cuda_rng is None and back.scaler is None
    with trainer.activate(back):
        assert p.data.data_ptr() == back.params["w"].data_ptr()


def test_placement_and_checkpointing_do_not_change_a_runs_fingerprint():
    base = RunConfig()
    moved = RunConfig.model_validate(
        {
            "train": {
                "device": "cpu",
                "node_devices": {"server": "cpu"},
                "gradient_checkpointing": True,
            }
        }
    )
    assert moved.fingerprint() == base.fingerprint()
    assert (
        RunConfig.model_validate({"train": {"autocast": "bf16"}}).fingerprint()
        != base.fingerprint()
    )
    assert (
        RunConfig.model_validate({"model": {"quantize": "nf4"}}).fingerprint() != base.fingerprint()
    )
