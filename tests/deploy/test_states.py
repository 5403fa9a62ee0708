"""A role state a device sends (snapshots for evaluation and checkpoints) is checked before the
server uses it: a bad one never reaches an evaluation or a checkpoint, nor the server's model."""

import io
import re

import pytest
import torch

from cotune.deploy.frames import DONE, Frame
from cotune.deploy.states import check_state, dump_state, load_state
from cotune.errors import PeerUnavailable, ProtocolError
from cotune.train import RoleState
from tests.deploy.fakes import remote_role


def good_state(value: float = 0.5) -> RoleState:
    return RoleState(
        params={"lora_A": torch.full((2, 4), value), "lora_B": torch.zeros(4, 2)},
        optim={"lora_A": {}, "lora_B": {}},
        step=3,
        rng=torch.get_rng_state(),
        sampler={"epoch": 0, "pos": 2},
    )


def test_a_good_state_round_trips_and_passes():
    st = load_state(dump_state({"state": good_state(), "kr": {"best": float("inf")}}))
    check_state(st)  # a non-finite number outside the parameters is the role's own business
    assert torch.equal(st["state"].params["lora_A"], torch.full((2, 4), 0.5))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda st: setattr(st, "params", {"lora_A": "weights"}), "params is not a mapping"),
        (lambda st: st.params["lora_B"].fill_(float("nan")), "params['lora_B'] holds a non-finite"),
        (lambda st: setattr(st, "optim", {"lora_A": 3}), "optim is not a mapping"),
        (lambda st: setattr(st, "step", -1), "step is negative"),
        (lambda st: setattr(st, "rng", torch.zeros(8)), "rng is not a generator state"),
        (lambda st: setattr(st, "sampler", [1, 2]), "sampler is not a mapping"),
    ],
)
def test_a_bad_role_state_is_refused_naming_its_field(change, field):
    st = good_state()
    change(st)
    with pytest.raises(ProtocolError, match=re.escape(f"state['state'].{field}")):
        check_state(load_state(dump_state({"state": st})))


def test_a_tagged_dict_that_is_not_a_role_state_is_a_protocol_error():
    buf = io.BytesIO()
    torch.save({"__cotune_role_state__": {"params": {}, "step": "three"}}, buf)
    with pytest.raises(ProtocolError, match="not a role state"):
        load_state(buf.getvalue())


def _role():
    return remote_role("device-0")


def _answer(hub, seq, state):
    hub.inbound.put(("device-0", Frame(DONE, {"seq": seq}, dump_state(state))))


def test_a_bad_snapshot_leaves_the_last_good_state_standing(caplog):
    hub, role = _role()
    _answer(hub, 1, good_state(0.5))
    assert torch.equal(role.snapshot().params["lora_A"], torch.full((2, 4), 0.5))
    bad = good_state(0.7)
    bad.params["lora_A"][0, 0] = float("inf")
    _answer(hub, 2, bad)
    kept = role.snapshot()
    assert torch.equal(kept.params["lora_A"], torch.full((2, 4), 0.5))
    assert "device-0 sent a bad state" in caplog.text
    assert "its last known state stands in" in caplog.text


def test_a_bad_first_snapshot_is_left_out_of_checkpoints_and_unavailable_to_evaluation(caplog):
    bad = good_state()
    bad.params["lora_A"].fill_(float("nan"))
    hub, role = _role()
    _answer(hub, 1, bad)
    assert role.snapshot_if_built() is None  # a checkpoint leaves it out: it starts afresh
    assert "left out (it starts afresh on resume)" in caplog.text
    _answer(hub, 2, bad)
    with pytest.raises(PeerUnavailable, match="device-0 sent a bad state: .*non-finite"):
        role.snapshot()
