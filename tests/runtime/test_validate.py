"""``check_activation`` and its finiteness test: every NaN and inf is found, at any position and
dtype, and huge finite values whose sum overflows are not mistaken for them."""

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.runtime.validate import all_finite, check_activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_non_finite_value_is_found(dtype, bad):
    t = torch.randn(3, 7, 5).to(dtype)
    for at in [(0, 0, 0), (1, 3, 2), (2, 6, 4)]:
        u = t.clone()
        u[at] = bad
        assert not all_finite(u)
    assert all_finite(t)


def test_an_overflowing_sum_of_finite_values_is_finite():
    assert all_finite(torch.full((100,), 3e38))  # the float32 sum is inf, every value finite
    assert all_finite(torch.full((100,), 1e300, dtype=torch.float64))
    assert all_finite(torch.full((100,), 6e4, dtype=torch.float16))
    assert all_finite(torch.empty(0))


def test_check_activation_names_the_tensor_and_counts():
    t = torch.zeros(2, 3)
    t[0, 1], t[1, 2] = float("nan"), float("inf")
    with pytest.raises(ProtocolError, match="tensor 'x': 1 NaN and 1 inf values among 6"):
        check_activation("tensor 'x'", t)
    assert check_activation("x", t, allow_nonfinite=True) is t


def test_a_peers_meta_number_is_checked_naming_the_message_and_field():
    from cotune.runtime import Message
    from cotune.runtime.validate import meta_number

    msg = Message("norm", "device-3", "server", {}, {"sq": 2, "bad": "2.0", "flag": True})
    assert meta_number(msg, "sq", minimum=0.0) == 2.0
    assert meta_number(msg, "absent", 0.5) == 0.5
    for key, value, extra in [
        ("bad", "'2.0'", {}),
        ("flag", "True", {}),
        ("sq", "2", {"minimum": 3.0}),
    ]:
        with pytest.raises(ProtocolError, match=f"'norm' from 'device-3'.*meta '{key}' is {value}"):
            meta_number(msg, key, **extra)
    msg.meta["inf"] = float("inf")
    with pytest.raises(ProtocolError, match="meta 'inf' is inf, expected a finite number"):
        meta_number(msg, "inf")
    with pytest.raises(ProtocolError, match="meta 'absent' is missing"):
        meta_number(msg, "absent")
