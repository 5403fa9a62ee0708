"""A deployed device must hold the server's frozen base: the welcome carries the server's
digest, and a device whose own differs (another checkpoint at the path, a release that
initialises random models otherwise) does not join, and says why."""

import pytest

pytest.importorskip("grpc")

import cotune.deploy.launch as launch_module  # noqa: E402
from cotune.deploy.device_inputs import check_base  # noqa: E402
from cotune.errors import ModelError, PeerUnavailable, ProtocolError  # noqa: E402

BASE = {"h.0.w": "0000000a", "h.1.w": "0000000b"}


def test_a_device_with_the_servers_base_passes_and_another_is_refused_with_the_names():
    check_base({"base": BASE}, dict(BASE))
    check_base({}, dict(BASE))  # a server that sends no digest: nothing to compare
    versions = {"cotune": "0.1.0", "torch": "2.11.0", "transformers": "5.17.0"}
    with pytest.raises(
        ModelError, match=r"1 of its 2 tensors and vocabulary differ \(h\.1\.w\)"
    ) as err:
        check_base({"base": BASE, "versions": versions}, {**BASE, "h.1.w": "0000000c"})
    assert "server: cotune 0.1.0, torch 2.11.0, transformers 5.17.0" in str(err.value)
    assert "this device: cotune " in str(err.value)
    with pytest.raises(ProtocolError, match="'base' is not a digest"):
        check_base({"base": ["h.0.w"]}, dict(BASE))


def test_a_device_whose_base_differs_from_the_servers_is_refused(tiny_config, monkeypatch):
    """The server's welcome is given a wrong digest for one tensor (the devices, forked from
    the warm interpreter, load the real base): every device refuses to join, the run stops
    before it starts, with the reason."""
    welcome = launch_module.welcome

    def tampered(exp):
        out = welcome(exp)
        first = sorted(out["base"])[0]
        out["base"] = {**out["base"], first: "ffffffff"}
        return out

    monkeypatch.setattr(launch_module, "welcome", tampered)
    cfg = tiny_config(name="other-base", paradigm={"name": "fedavg"}, engine={"join_timeout_s": 60})
    with pytest.raises(PeerUnavailable, match=r"base model here is not the server's: 1 of its \d+"):
        launch_module.launch(cfg, quiet=True, report=False)
