"""The gRPC transport: chunked frames, TLS, mutual TLS and per-device tokens (loopback)."""

import os

import pytest

pytest.importorskip("grpc")

from cotune.deploy.frames import CHUNK, HELLO, REFUSED, SEND, WELCOME, Frame, Reassembler, chunks  # noqa: E402
from cotune.deploy.launch import make_certs, read_tokens  # noqa: E402
from cotune.deploy.security import Security, token_hash
from cotune.deploy.transport import Dialer, Hub  # noqa: E402
from cotune.errors import ConfigError, ProtocolError  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    make_certs(d, ["device-0", "device-1"], ["localhost", "127.0.0.1"])
    return d


def tokens(certs):
    return {d: (certs / f"{d}.token").read_text().strip() for d in ("device-0", "device-1")}


def hub(security, token_hashes):
    return Hub("127.0.0.1:0", security, token_hashes, {"config": {"name": "t"}})


def first(dialer, timeout=10):
    return dialer.inbound.get(timeout=timeout)


def test_frames_round_trip_in_chunks():
    payload = os.urandom(3 * CHUNK + 17)
    frame = Frame(SEND, {"codec": "fp32"}, payload)
    parts = list(chunks(7, frame.encode()))
    assert len(parts) == 4 and all(len(p) <= CHUNK + 13 for p in parts)
    r = Reassembler(1 << 30)
    out = [r.add(p) for p in parts]
    assert out[:3] == [None, None, None] and out[3].payload == payload
    with pytest.raises(ProtocolError, match="chunk 1 arrived after 0"):
        Reassembler(1 << 30).add(parts[1])
    with pytest.raises(ProtocolError, match="exceeds 100 bytes"):
        Reassembler(100).add(parts[0])
    with pytest.raises(ProtocolError, match="unknown frame type"):
        Frame.decode(b"\xff\x00\x00\x00\x00")


@pytest.mark.parametrize("extra", [-1, 0, 1, CHUNK - 40, 2 * CHUNK])
def test_a_frame_cut_from_its_pieces_equals_its_encoding_cut(extra):
    """frame_chunks cuts the prefix and the payload without joining them first: the messages
    are byte for byte those of the joined encoding, and they reassemble to the same frame."""
    from cotune.deploy.frames import frame_chunks

    frame = Frame(SEND, {"codec": "fp32", "pad": "x" * 50}, os.urandom(CHUNK + extra))
    parts = list(frame_chunks(3, frame))
    assert parts == list(chunks(3, frame.encode())) and len(parts) >= 2
    r = Reassembler(1 << 30)
    got = [r.add(p) for p in parts][-1]
    assert type(got.payload) is bytes and got.payload == frame.payload
    assert got.header == frame.header and got.type == SEND


def test_an_encoded_message_is_framed_from_its_pieces_and_received_without_a_copy():
    """A message leaves as pieces (views of its tensors) joined once into its gRPC message, and
    a one-chunk frame's payload is a view into the received message, not a copy of it."""
    import torch

    from cotune.deploy.frames import REQUEST, frame_chunks
    from cotune.runtime.message_decode import decode_message
    from cotune.runtime.messages import (
        Message,
        encode_message,
        encode_message_pieces,
    )

    msg = Message("activations", "server", "device-0", {"hidden": torch.randn(4, 96, 64)})
    pieces = encode_message_pieces(msg, "fp32")
    assert bytes(pieces) == encode_message(msg, "fp32") and len(pieces) == len(bytes(pieces))
    (wire,) = frame_chunks(5, Frame(REQUEST, {"seq": 5}, pieces))
    assert wire == next(frame_chunks(5, Frame(REQUEST, {"seq": 5}, encode_message(msg))))
    got = Reassembler(1 << 30).add(wire)
    assert isinstance(got.payload, memoryview) and got.payload.obj is wire
    assert torch.equal(decode_message(got.payload).tensors["hidden"], msg.tensors["hidden"])


def test_a_ray_host_module_loads_without_torch():
    """A Ray host sets its threads' environment (OMP_NUM_THREADS, OMP_WAIT_POLICY) in its
    constructor, after its module (and the frames) were imported: torch must not be loaded by
    then, or the settings come too late (and float results differ from the local engine's)."""
    import subprocess
    import sys

    code = "import sys, cotune.deploy.rayhost; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_frame_kept_after_send_owns_its_bytes():
    """``owned()`` joins an encoded payload then and there: a sender that queues the frame (Ray)
    ships the tensors as they were when sent, not as they are later."""
    import torch

    from cotune.deploy.frames import REPLY
    from cotune.deploy.rayhost import QueueDialer
    from cotune.runtime.message_decode import decode_message
    from cotune.runtime.messages import Message, encode_message_pieces

    t = torch.zeros(8)
    dialer = QueueDialer(["device-0"])
    dialer.send(Frame(REPLY, {"seq": 1}, encode_message_pieces(Message("u", "a", "b", {"w": t}))))
    t += 1  # the role goes on training after it replied
    _, queued = dialer.outbound.get_nowait()
    assert type(queued.payload) is bytes
    assert torch.equal(decode_message(queued.payload).tensors["w"], torch.zeros(8))
    plain = Frame(REPLY, {}, b"abc")
    assert plain.owned() is plain


def test_tls_tokens_and_a_large_message_both_ways(certs):
    sec = Security(tls_dir=certs)
    h = hub(sec, read_tokens(str(certs / "tokens.yaml")))
    try:
        dev = Dialer(h.address, "device-0", tokens(certs)["device-0"], sec)
        welcome = first(dev)
        assert welcome.type == WELCOME and welcome.header["config"] == {"name": "t"}
        big = os.urandom(80 << 20)  # 80 MiB: 80 gRPC messages each way
        dev.send(Frame(SEND, {"n": 1}, big))
        node, got = h.inbound.get(timeout=60)
        assert node == "device-0" and got.payload == big
        h.links["device-0"].send(Frame(SEND, {"n": 2}, big))
        back = first(dev, timeout=60)
        assert back.header == {"n": 2} and back.payload == big
        dev.close()
    finally:
        h.close()


@pytest.mark.parametrize(
    "who,token,why",
    [
        ("device-0", "not-the-token", "wrong token"),
        ("device-9", "x", "no credentials for this node id"),
    ],
)
def test_bad_credentials_are_refused_with_a_reason(certs, caplog, who, token, why):
    sec = Security(tls_dir=certs)
    h = hub(sec, read_tokens(str(certs / "tokens.yaml")))
    try:
        dev = Dialer(h.address, who, token, sec)
        got = first(dev)
        assert got.type == REFUSED and got.header["error"] == why
        assert who not in h.links  # it never joined, never receives a message
        dev.close()
    finally:
        h.close()
    assert f"refused a device claiming {who!r}: {why}" in caplog.text


def test_a_second_device_with_the_same_id_is_refused(certs):
    sec = Security(tls_dir=certs)
    h = hub(sec, read_tokens(str(certs / "tokens.yaml")))
    try:
        a = Dialer(h.address, "device-0", tokens(certs)["device-0"], sec)
        assert first(a).type == WELCOME
        b = Dialer(h.address, "device-0", tokens(certs)["device-0"], sec)
        got = first(b)
        assert got.type == REFUSED and "already connected" in got.header["error"]
        a.close(), b.close()
    finally:
        h.close()


def test_mutual_tls_binds_the_certificate_to_the_device_id(certs, tmp_path):
    sec = Security(tls_dir=certs, mutual=True)
    h = hub(sec, read_tokens(str(certs / "tokens.yaml")))
    try:
        ok = Dialer(h.address, "device-1", tokens(certs)["device-1"], sec)
        assert first(ok).type == WELCOME
        # device-0's certificate and token, claiming to be device-1's second self: refused.
        spoof = tmp_path / "spoof"
        spoof.mkdir()
        (spoof / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
        (spoof / "device-1.pem").write_bytes((certs / "device-0.pem").read_bytes())
        (spoof / "device-1.key").write_bytes((certs / "device-0.key").read_bytes())
        bad = Dialer(h.address, "device-1", tokens(certs)["device-1"], Security(spoof, mutual=True))
        got = first(bad)
        assert got.type == REFUSED and "certificate is not device-1's" in got.header["error"]
        ok.close(), bad.close()
    finally:
        h.close()


def test_a_device_that_does_not_trust_the_server_never_connects(certs, tmp_path):
    other = make_certs(tmp_path / "other", ["device-0"], ["localhost"])
    h = hub(Security(tls_dir=certs), read_tokens(str(certs / "tokens.yaml")))
    try:
        dev = Dialer(h.address, "device-0", tokens(certs)["device-0"], Security(tls_dir=other))
        assert first(dev, timeout=20) is None  # the TLS handshake fails: the stream ends
        dev.close()
    finally:
        h.close()


def test_plain_text_needs_an_explicit_insecure_flag():
    with pytest.raises(ConfigError, match="pass --tls DIR .* or --insecure"):
        Security().check()
    h = hub(Security(insecure=True), None)
    try:
        dev = Dialer(h.address, "device-3", "", Security(insecure=True))
        assert first(dev).type == WELCOME
        dev.close()
    finally:
        h.close()


def test_token_files_are_validated(tmp_path):
    bad = tmp_path / "tokens.yaml"
    bad.write_text("device-0: not-a-hash\n")
    with pytest.raises(ConfigError, match="must map device ids to SHA-256 hex digests"):
        read_tokens(str(bad))
    with pytest.raises(ConfigError, match="engine.tokens_file not found: .*missing.yaml"):
        read_tokens(str(tmp_path / "missing.yaml"))
    bad.write_text("device-0: aa\ndevice-1: [bb\n")
    with pytest.raises(ConfigError, match=r"tokens.yaml:3: engine.tokens_file is not valid YAML"):
        read_tokens(str(bad))
    assert len(token_hash("x")) == 64 and HELLO == 1


def test_one_process_hosting_two_devices_dials_each_as_itself(certs, tmp_path):
    """`cotune device --id device-0 --id device-1 --token-dir`: a stream per device, each with
    its own token and certificate; their frames reach one queue, each naming its device; a
    wrong token for either one refuses that one, named."""
    from cotune.cli_deploy import device_tokens
    from cotune.deploy.connect import DialerGroup, _serve_once
    from cotune.deploy.device import DeviceRefused

    sec = Security(tls_dir=certs, mutual=True)
    creds = device_tokens(["device-0", "device-1"], None, certs)
    assert creds == tokens(certs)
    h = hub(sec, read_tokens(str(certs / "tokens.yaml")))
    try:
        pair = {n: Dialer(h.address, n, t, sec) for n, t in creds.items()}
        assert [first(d).type for d in pair.values()] == [WELCOME, WELCOME]
        group = DialerGroup(pair)
        for node in ("device-1", "device-0"):
            h.links[node].send(Frame(SEND, {"codec": "fp32"}, node.encode()))
        got = [group.inbound.get(timeout=10) for _ in range(2)]
        assert sorted((f.header["node"], f.payload) for f in got) == [
            ("device-0", b"device-0"), ("device-1", b"device-1")]  # fmt: skip
        with pytest.raises(ProtocolError, match="'device-7' is not one of this process's"):
            group.send(Frame(SEND, {}), "device-7")
        group.close()
        bad = {"device-0": creds["device-0"], "device-1": "not-the-token"}
        with pytest.raises(DeviceRefused, match="refused device-1: wrong token"):
            _serve_once(h.address, bad, sec, 10)
    finally:
        h.close()
    from cotune.deploy.connect import run_device

    with pytest.raises(ConfigError, match="--data: a process hosting several devices"):
        run_device("localhost:1", creds, sec, data_file=tmp_path / "mine.jsonl")
    with pytest.raises(ConfigError, match="one token cannot serve several --id"):
        device_tokens(["device-0", "device-1"], "tok", None)
    with pytest.raises(ConfigError, match="--token-dir: cannot read .*device-5.token"):
        device_tokens(["device-5"], None, certs)
    with pytest.raises(ConfigError, match="--id: a device given twice"):
        device_tokens(["device-0", "device-0"], None, certs)


def test_a_device_cannot_complete_a_request_sent_to_another(caplog):
    """Replies are bound to the node they were asked of: a device answering another's
    request (or with a malformed sequence number) is dropped and logged, and the real answer
    still completes it; a process key that is not a string groups nothing."""
    import queue

    from cotune.deploy.frames import REPLY
    from cotune.deploy.server import GrpcEngine

    class FakeHub:
        def __init__(self):
            self.inbound, self.links, self.ready = queue.Queue(), {}, {}

    hub = FakeHub()
    engine = GrpcEngine(hub, timeout_s=5)
    mine, theirs = engine._ask("device-1"), engine._ask("device-0")
    hub.inbound.put(("device-1", Frame(REPLY, {"seq": theirs}, b"forged")))
    hub.inbound.put(("device-1", Frame(REPLY, {"seq": "x"}, b"malformed")))
    hub.inbound.put(("device-1", Frame(REPLY, {"seq": mine}, b"mine")))
    hub.inbound.put(("device-0", Frame(REPLY, {"seq": theirs}, b"real")))
    assert engine._wait("device-1", mine).payload == b"mine"
    assert engine._wait("device-0", theirs).payload == b"real"
    assert "device-1 sent a" in caplog.text and f"for {theirs}, which was not asked" in caplog.text
    assert "for 'x', which was not asked of it: dropped" in caplog.text
    real = Hub.host_of
    fake = FakeHub()
    fake.ready = {"device-0": {"process_key": ["not", "a", "key"]}, "device-1": {}}
    assert real(fake, "device-0") == ("node", "device-0") and real(fake, "device-1") == (
        "node",
        "device-1",
    )


def test_a_bad_meter_report_or_join_report_is_dropped_not_the_runs_end(caplog):
    """Reports from a device feed the simulator: malformed ones (wrong types, negative or
    non-finite FLOPs, another role's work, a bad memory estimate) are dropped and logged; a
    join report that cannot say what the device holds fails that device's join."""
    import queue

    from cotune.deploy.frames import METER, READY
    from cotune.deploy.server import GrpcEngine
    from cotune.deploy.transport import Joining

    class Sink:
        def __init__(self):
            self.compute_calls, self.memory_calls = [], []

        def compute(self, role, flops, **kw):
            self.compute_calls.append((role, flops, kw["round"]))

        def memory(self, role, key, probe):
            self.memory_calls.append((role, key, probe().total))

    class FakeHub:
        inbound, links, ready = queue.Queue(), {}, {}

    engine = GrpcEngine(FakeHub(), timeout_s=5)
    engine.grid = type("G", (), {"sink": Sink()})()
    sink = engine.grid.sink
    est = {"weights": 1, "grads": 1, "optimizer": 2, "activations": 3, "total": 7}
    bad = [
        {"what": "compute", "role": "device-0", "flops": "many", "round": 1},
        {"what": "compute", "role": "device-0", "flops": float("nan"), "round": 1},
        {"what": "compute", "role": "device-0", "flops": -5.0, "round": 1},
        {"what": "compute", "role": "device-0", "flops": float("inf"), "round": 1},
        {"what": "compute", "role": "device-0", "flops": 5.0, "round": 1, "after": "later"},
        {"what": "compute", "role": "device-0", "flops": 5.0, "round": "one"},
        {"what": "compute", "role": "device-1", "flops": 5.0, "round": 1},  # another's work
        {"what": "compute", "role": "device-0"},
        {"what": "memory", "role": "device-0", "key": "k", "estimate": {**est, "total": "big"}},
        {"what": "memory", "role": "device-0", "key": "k", "estimate": {"bogus": 1}},
        {"what": "memory", "role": "device-0", "key": 3, "estimate": est},
    ]
    for h in bad:
        engine._dispatch("device-0", Frame(METER, h))
    engine._dispatch("device-0", Frame(METER, {"what": "compute", "role": "device-0",
                                                "flops": 5.0, "round": 1}))  # fmt: skip
    engine._dispatch("device-0", Frame(METER, {"what": "memory", "role": "device-0", "key": "k",
                                                "estimate": est}))  # fmt: skip
    assert sink.compute_calls == [("device-0", 5.0, 1)]
    assert sink.memory_calls == [("device-0", "k", 7)]
    assert caplog.text.count("dropped a bad meter report from device-0") == len(bad)
    joining = Joining()
    assert joining.take("device-2", Frame(READY, {"examples": "lots"}))
    assert joining.take("device-3", Frame(READY, {"examples": 12, "process_key": ["x"]}))
    assert joining.take("device-4", Frame(READY, {"examples": 12, "process": "vm:1"}))
    assert set(joining.failed) == {"device-2", "device-3"} and set(joining.ready) == {"device-4"}
    assert "examples='lots' is not a number of examples" in joining.failed["device-2"]


def test_a_message_asking_for_a_codec_cotune_lacks_is_dropped(caplog):
    """A device's message whose frame or meta names an unknown codec (or not a name) is a bad
    message: dropped and logged, a request answered with an error, the server goes on."""
    import queue

    from cotune.deploy.frames import ERROR, REQUEST
    from cotune.deploy.server import GrpcEngine
    from cotune.runtime.messages import Message, encode_message

    class Link:
        open = True

        def __init__(self):
            self.sent = []

        def send(self, frame):
            self.sent.append(frame)

    class FakeHub:
        def __init__(self):
            self.inbound, self.ready = queue.Queue(), {}
            self.links = {"device-0": Link()}

    hub = FakeHub()
    engine = GrpcEngine(hub, timeout_s=5)
    engine.links_seen["device-0"] = hub.links["device-0"]
    good = encode_message(Message("hello", "device-0", "server", {}, {}), "fp32")
    bad_meta = encode_message(Message("hello", "device-0", "server", {}, {"codec": "zip"}), "fp32")
    engine._from_device("device-0", Frame(SEND, {"codec": "bogus"}, good))
    engine._from_device("device-0", Frame(SEND, {"codec": ["fp32"]}, good))
    engine._from_device("device-0", Frame(REQUEST, {"seq": 4}, bad_meta))
    assert caplog.text.count("dropped a bad message from device-0") == 3
    assert "unknown codec 'bogus'" in caplog.text and "codec ['fp32'] is not a name" in caplog.text
    (reply,) = hub.links["device-0"].sent
    assert reply.type == ERROR and reply.header["seq"] == 4 and "'zip'" in reply.header["error"]


def test_a_devices_measurements_are_numbers_only(caplog):
    from cotune.deploy.frames import DONE
    from tests.deploy.fakes import remote_role

    hub, role = remote_role()
    values = {"node_busy_s": 1.5, "train_host_s": "fast", "x": float("inf"), "n": 3}
    hub.inbound.put(("device-0", Frame(DONE, {"seq": 1, "values": values})))
    assert role.measurements() == {"node_busy_s": 1.5, "n": 3.0}
    assert "device-0 reported measurements that are not numbers" in caplog.text


def test_a_batch_frames_wire_bytes_are_shared_out_by_message_size():
    from types import SimpleNamespace

    from cotune.deploy.server import _share_wire_bytes

    links = [SimpleNamespace(bytes_out=1000 + 1001), SimpleNamespace(bytes_out=7)]
    _share_wire_bytes(1001, links, [300, 600])  # the frame's 1001 bytes went on links[0]
    assert [link.bytes_out for link in links] == [1000 + 334, 7 + 667]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_device_started_before_its_server_waits_for_it_and_joins(certs):
    """`cotune device` may start before `cotune serve` listens (the server still loading its
    model): the dial tries again until its timeout instead of giving up at once."""
    import threading
    import time

    from cotune.deploy.connect import _dial

    port, sec, box = _free_port(), Security(tls_dir=certs), {}

    def serve_later():
        time.sleep(1.5)
        box["hub"] = Hub(f"127.0.0.1:{port}", sec, read_tokens(str(certs / "tokens.yaml")),
                         {"config": {"name": "late"}})  # fmt: skip

    later = threading.Thread(target=serve_later)
    later.start()
    try:
        dialer, welcome = _dial(f"127.0.0.1:{port}", "device-0", tokens(certs)["device-0"], sec,
                                connect_timeout=30)  # fmt: skip
        assert welcome.type == WELCOME and welcome.header["config"] == {"name": "late"}
        dialer.close()
    finally:
        later.join()
        box["hub"].close()


def test_a_dial_that_cannot_succeed_fails_with_what_grpc_said(certs, tmp_path):
    import time

    from cotune.deploy.connect import _dial
    from cotune.errors import PeerUnavailable

    tok = tokens(certs)["device-0"]
    # A server it does not trust: at once, with the TLS failure (no waiting out the timeout).
    other = make_certs(tmp_path / "other", ["device-0"], ["localhost"])
    h = hub(Security(tls_dir=certs), read_tokens(str(certs / "tokens.yaml")))
    try:
        t0 = time.monotonic()
        want = r"could not connect to .*: UNAVAILABLE: .*[Hh]andshake.*signed by this device's ca"
        with pytest.raises(PeerUnavailable, match=want):
            _dial(h.address, "device-0", tok, Security(tls_dir=other), connect_timeout=60)
        assert time.monotonic() - t0 < 20
    finally:
        h.close()
    # A server that asks for device certificates (mutual TLS), dialled without one.
    h = hub(Security(tls_dir=certs, mutual=True), read_tokens(str(certs / "tokens.yaml")))
    try:
        with pytest.raises(PeerUnavailable, match=r"do both sides agree on --mutual-tls"):
            _dial(h.address, "device-0", tok, Security(tls_dir=certs), connect_timeout=60)
    finally:
        h.close()
    # Nobody listening until the timeout: gRPC's refusal is the reason given.
    with pytest.raises(PeerUnavailable, match="Connection refused"):
        _dial(f"127.0.0.1:{_free_port()}", "device-0", tok, Security(tls_dir=certs),
              connect_timeout=2)  # fmt: skip
