import pytest

from cotune.errors import ProtocolError
from cotune.runtime.engine import Transfer
from cotune.runtime.transfers import TransferLog


def _t(seq, sender="device-0", receiver="server", nbytes=10):
    return Transfer(seq, sender, receiver, "x", nbytes, "fp32")


def test_totals_cover_every_transfer_while_only_recent_ones_are_kept():
    log = TransferLog(keep=3)
    for i in range(5):
        log.append(_t(i, nbytes=i + 1))
    log.append(_t(5, sender="server", receiver="device-1", nbytes=100))
    assert len(log) == 6 and log.first_kept == 3
    assert log.total_bytes == 1 + 2 + 3 + 4 + 5 + 100
    assert log.bytes_of("device-0") == (15, 0) and log.bytes_of("server") == (100, 15)
    assert log.bytes_of("nobody") == (0, 0)
    assert [t.seq for t in log[4:]] == [4, 5] and log[-1].seq == 5 and log[3].seq == 3
    assert [t.seq for t in log] == [3, 4, 5]
    with pytest.raises(ProtocolError, match="no longer kept: the log holds the last 3 of 6"):
        log[1:]
    with pytest.raises(ProtocolError, match="no longer kept"):
        log[0]
    with pytest.raises(IndexError):
        log[6]
    assert log[6:] == []  # a round that has sent nothing yet


def test_a_log_equals_the_list_of_its_transfers():
    log = TransferLog()
    ts = [_t(i) for i in range(3)]
    log.extend(ts)
    assert log == ts and ts == log
    a, b, c = log
    assert (a, b, c) == tuple(ts)
