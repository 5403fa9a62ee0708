"""What the server takes from a device besides its messages (cotune.deploy.peer_input)."""

import math

import numpy as np
import pytest

from cotune.deploy.peer_input import check_codec, text, tick_result
from cotune.errors import ProtocolError
from cotune.runtime.validate import finite_number


def test_a_local_events_result_must_be_a_number_or_nothing():
    assert tick_result("device-0", "step", None) is None
    assert tick_result("device-0", "step", 2) == 2.0
    for bad in ("many", float("nan"), [1.0], True):
        with pytest.raises(ProtocolError, match="device-0 answered its 'step' event with"):
            tick_result("device-0", "step", bad)


def test_a_codec_a_peer_asks_for_is_one_cotune_has():
    for ok in (None, "fp32", "int8", "topk0.05"):
        check_codec(ok)
    with pytest.raises(ProtocolError, match="codec 'zip'"):
        check_codec("zip")
    with pytest.raises(ProtocolError, match=r"codec \['fp32'\] is not a name"):
        check_codec(["fp32"])


def test_a_peers_number_is_a_finite_int_or_float_only():
    assert finite_number(3) and finite_number(-2.5) and finite_number(0.0)
    assert finite_number(np.float64(0.5))  # what the in-process engine may hand over
    for bad in (math.inf, -math.inf, math.nan, True, "1.0", None, [1.0], np.float64("nan")):
        assert not finite_number(bad)


def test_a_peers_self_description_is_a_string_cut_short():
    assert text("laptop-3:1234") == "laptop-3:1234"
    assert text("x" * 500) == "x" * 200 and text("abc", limit=2) == "ab"
    assert text(None) is None and text(42) is None and text(["a"]) is None
