"""privacy.py: the accountant is Opacus's (its published figures come back), clipping bounds an
update, noise is reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from cotune.errors import ConfigError
from cotune.privacy import PrivacyLedger, add_noise, clipped_delta, default_delta, noise_for_epsilon


def test_the_ledger_spends_what_opacus_publishes():
    # Opacus's own accounting figures: sigma 1.5, sampling rate 0.04, 90 epochs (2250 steps).
    ledger = PrivacyLedger("rdp", 1e-5)
    assert ledger.epsilon() is None
    for _ in range(2250):
        ledger.spend(1.5, 0.04)
    assert ledger.epsilon() == pytest.approx(7.32911117143, rel=1e-9)
    # The noise for a target: Opacus searches it to within its tolerance (0.01 in epsilon).
    sigma = noise_for_epsilon(8.0, 1e-5, 0.04, 2250, "rdp")
    check = PrivacyLedger("rdp", 1e-5)
    for _ in range(2250):
        check.spend(sigma, 0.04)
    assert 7.98 <= check.epsilon() <= 8.0 and sigma == pytest.approx(1.42, abs=0.01)
    # The history is the state: a resumed run continues from it.
    again = PrivacyLedger("rdp", 1e-5)
    again.load_state_dict(ledger.state_dict())
    assert again.epsilon() == ledger.epsilon()


def test_local_dp_reports_the_device_that_spent_most():
    ledger = PrivacyLedger("rdp", 1e-5)
    for _ in range(3):
        ledger.spend(2.0, 1.0, who="device-0")
    ledger.spend(2.0, 1.0, who="device-1")
    one = PrivacyLedger("rdp", 1e-5)
    for _ in range(3):
        one.spend(2.0, 1.0)
    assert ledger.epsilon() == one.epsilon()
    assert 0 < default_delta(100) < 1 / 100


def test_clipping_bounds_an_update_and_keeps_a_small_one():
    ref = {"a": torch.zeros(3), "b": torch.ones(2)}
    big = {"a": torch.tensor([3.0, 0.0, 4.0]), "b": torch.ones(2)}  # change of norm 5
    delta, norm = clipped_delta(big, ref, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values())) == pytest.approx(1.0)
    small, _ = clipped_delta(big, ref, 10.0)
    torch.testing.assert_close(small["a"], big["a"])


def test_noise_is_reproducible_and_scaled():
    x = {"w": torch.zeros(20000)}
    a = add_noise(x, 0.5, torch.Generator().manual_seed(3))["w"]
    b = add_noise(x, 0.5, torch.Generator().manual_seed(3))["w"]
    assert torch.equal(a, b) and float(a.std()) == pytest.approx(0.5, rel=0.03)
    assert add_noise(x, 0.0, torch.Generator()) is x


def test_strong_noise_is_accounted_at_the_order_that_bounds_it_tightest(recwarn):
    """Much noise over few rounds spends its least epsilon at an RDP order above Opacus's
    default grid (63): the ledger asks higher orders too, so it reports the tight bound (here
    less than half the default grid's) and Opacus has nothing to warn about."""
    from opacus.accountants import RDPAccountant

    ledger, default = PrivacyLedger("rdp", 1e-5), RDPAccountant()
    ledger.spend(5.0, 0.001)
    default.step(noise_multiplier=5.0, sample_rate=0.001)
    loose = default.get_epsilon(delta=1e-5)  # its best order is the grid's last: 63
    fine = default.get_epsilon(delta=1e-5, alphas=list(range(2, 800)))  # every integer order to 800
    assert ledger.epsilon() < 0.5 * loose
    assert fine <= ledger.epsilon() <= 1.05 * fine  # its orders are 5% apart
    recwarn.clear()
    ledger.epsilon()
    # The noise search tries too little noise on its way: no warning from those tries either.
    noise_for_epsilon(8.0, 1e-3, 0.5, 1, "rdp")
    assert not [w for w in recwarn if "largest alpha" in str(w.message)]


def test_a_small_target_epsilon_gets_its_noise_or_a_clear_error():
    """Below ~0.1 no noise spends the target on Opacus's default orders (its search gives
    up); on the wider grid 0.05 is reached. A target nothing reaches names the field."""
    sigma = noise_for_epsilon(0.05, 1e-5, 0.001, 1, "rdp")
    ledger = PrivacyLedger("rdp", 1e-5)
    ledger.spend(sigma, 0.001)
    assert 0.04 <= ledger.epsilon() <= 0.05  # Opacus searches to within 0.01 in epsilon
    with pytest.raises(ConfigError, match=r"train\.dp\.target_epsilon: 0\.0001 cannot be spent"):
        noise_for_epsilon(1e-4, 1e-5, 0.001, 1, "rdp")
