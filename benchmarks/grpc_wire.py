"""The gRPC engine's wire costs on loopback, measured side by side.

1. Round trip of a 1.5 MiB activation message (cotune's frames: encode, chunk, stream, decode,
   answer with a message of the same size) vs a raw gRPC unary echo of the same bytes.
2. Throughput of one large message (default 256 MiB, an emulator's worth) server -> device.
3. A split step over gRPC vs the `local` engine, same job: the demo's splitfed on MiniLM, 4
   devices x batch 4 (host seconds per step between the first and last step records), with
   every device in its own process, and with ``--devices-per-process N`` also N devices per
   process (`cotune launch --devices-per-process`), the arms alternating. ``--random-base``
   trains a randomly initialised BERT of MiniLM's shape instead (the same arithmetic per step;
   for a machine without the MiniLM package, such as a lent GPU box: scripts/gpu_check.sh).

Run: .venv/bin/python benchmarks/grpc_wire.py [--rtt 50] [--big-mib 256] [--steps 20]
     [--devices-per-process 1 4] [--launch-env GOMP_SPINCOUNT=20000]
Targets (issue 13): (1) <= 8 ms median; (2) >= 300 MB/s; (3) ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from cotune.deploy.frames import DONE, REPLY, REQUEST, SEND, Frame
from cotune.deploy.security import Security
from cotune.deploy.transport import Dialer, Hub
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message_pieces

ROOT = Path(__file__).resolve().parents[1]
# all-MiniLM-L6-v2's BERT dimensions (its vocabulary aside: a random base uses cotune's BPE).
MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                "intermediate_size": 1536}  # fmt: skip


def echo_device(dialer: Dialer) -> None:
    while True:
        f = dialer.inbound.get()
        if f is None:
            return
        if f.type == REQUEST:
            msg = decode_message(f.payload)
            reply = msg.reply("back", msg.tensors)
            dialer.send(
                Frame(REPLY, {"seq": f.header["seq"]}, encode_message_pieces(reply, "fp32"))
            )
        elif f.type == SEND:
            dialer.send(Frame(DONE, {"n": len(f.payload)}))


def cotune_rtt(n: int) -> tuple[list[float], Hub, Dialer]:
    sec = Security(insecure=True)
    hub = Hub("127.0.0.1:0", sec, None, {})
    dev = Dialer(hub.address, "device-0", "", sec)
    dev.inbound.get(timeout=10)  # welcome
    threading.Thread(target=echo_device, args=(dev,), daemon=True).start()
    link = hub.links["device-0"]
    acts = torch.randn(4, 96, 1024)  # 1.5 MiB of fp32 activations
    times = []
    for i in range(n + 5):
        t = time.perf_counter()
        data = encode_message_pieces(
            Message("activations", "server", "device-0", {"hidden": acts}), "fp32"
        )
        link.send(Frame(REQUEST, {"seq": i}, data))
        _, f = hub.inbound.get()
        decode_message(f.payload)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return times, hub, dev


def raw_grpc_rtt(n: int, nbytes: int) -> list[float]:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    opts = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    server = grpc.server(ThreadPoolExecutor(4), options=opts)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    echo = channel.unary_unary("/bench.Echo/Echo")
    payload = bytes(nbytes)
    times = []
    for i in range(n + 5):
        t = time.perf_counter()
        echo(payload)
        if i >= 5:
            times.append(time.perf_counter() - t)
    channel.close()
    server.stop(0)
    return times


def throughput(hub: Hub, mib: int) -> float:
    big = bytes(mib << 20)
    link = hub.links["device-0"]
    t = time.perf_counter()
    link.send(Frame(SEND, {}, big))
    _, f = hub.inbound.get()
    assert f.type == DONE and f.header["n"] == len(big)
    return len(big) / (time.perf_counter() - t) / 1e6


def split_ratio(
    steps: int,
    repeats: int = 3,
    groupings: tuple[int, ...] = (1,),
    env: dict[str, str] | None = None,
    random_base: bool = False,
) -> tuple[float, dict[tuple[int, bool], float]]:
    """Median host seconds per step: ``cotune run`` (the local engine) and ``cotune launch``
    with each grouping of devices per process, each arm its own command as a user runs it;
    with ``env``, each grouping also launched with those variables (server and devices)."""
    import subprocess
    import sys

    import yaml

    from cotune.config import read_yaml

    d = read_yaml(ROOT / "configs/demo/splitfed.yaml")
    out = Path(tempfile.mkdtemp(prefix="grpc_wire_"))
    d["devices"]["count"] = 4
    if random_base:
        d["model"] = {**d["model"], "name_or_path": "random:bert", "random_config": MINILM_SHAPE}
    d["train"].update(steps=steps, batch_size=4)
    d["eval"] = {"every": 10_000, "max_examples": 8}
    d["output"] = {"checkpoint_every": 0, "save_adapter": False}
    d.setdefault("paradigm", {}).setdefault("options", {})["cohort"] = False

    def per_step(name: str, *command: str, extra: dict[str, str] | None = None) -> float:
        cfg = out / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**d, "name": name}))
        argv = [sys.executable, "-m", "cotune.cli", *command, str(cfg), "--quiet",
                "--overwrite", "--out", str(out)]  # fmt: skip
        run_env = {**os.environ, **(extra or {})}
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=run_env)
        recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["event"] == "train" and r["role"] in ("server", "mean")]
        return (train[-1]["host_time_s"] - train[0]["host_time_s"]) / (len(train) - 1)

    arms = [(g, False) for g in groupings] + ([(g, True) for g in groupings] if env else [])
    local: list[float] = []
    remote: dict[tuple[int, bool], list[float]] = {a: [] for a in arms}
    for _ in range(repeats):  # alternating, so machine noise hits every arm alike
        local.append(per_step("local", "run"))
        for g, with_env in arms:
            remote[(g, with_env)].append(per_step(
                f"grpc-{g}{'-env' if with_env else ''}", "launch", "--devices-per-process",
                str(g), extra=env if with_env else None))  # fmt: skip
    return statistics.median(local), {a: statistics.median(v) for a, v in remote.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt", type=int, default=50)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-split", action="store_true", help="only (1) and (2)")
    ap.add_argument(
        "--devices-per-process",
        type=int,
        nargs="+",
        default=[1],
        help="(3) launched with these many devices per process, each an arm",
    )
    ap.add_argument("--launch-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="(3) also launch each grouping with these environment variables "
                         "(e.g. GOMP_SPINCOUNT=20000)")  # fmt: skip
    ap.add_argument("--random-base", action="store_true",
                    help="(3) a random BERT of MiniLM's shape instead of MiniLM")  # fmt: skip
    args = ap.parse_args()
    raw = raw_grpc_rtt(args.rtt, 4 * 96 * 1024 * 4)
    ours, hub, dev = cotune_rtt(args.rtt)
    mbps = throughput(hub, args.big_mib)
    dev.close()
    hub.close()
    med, raw_med = statistics.median(ours) * 1e3, statistics.median(raw) * 1e3
    print(
        f"1.5 MiB round trip: cotune {med:.2f} ms median, raw gRPC unary {raw_med:.2f} ms "
        f"(ratio {med / raw_med:.2f}; target <= 8 ms: {'met' if med <= 8 else 'NOT met'})"
    )
    print(
        f"{args.big_mib} MiB message: {mbps:.0f} MB/s (target >= 300: "
        f"{'met' if mbps >= 300 else 'NOT met'})"
    )
    if args.no_split:
        return
    env = dict(kv.split("=", 1) for kv in args.launch_env)
    local, remote = split_ratio(
        args.steps, args.repeats, tuple(args.devices_per_process), env, args.random_base
    )
    base = "random MiniLM-shaped BERT" if args.random_base else "MiniLM"
    for (g, with_env), t in remote.items():
        ratio = t / local
        how = f"{g} per device process" + (f", {' '.join(args.launch_env)}" if with_env else "")
        print(
            f"splitfed step ({base}, {os.cpu_count()} CPUs, 4 devices x batch 4, {how}): local "
            f"{local * 1e3:.1f} ms, gRPC {t * 1e3:.1f} ms, ratio {ratio:.3f} (target <= 1.10: "
            f"{'met' if ratio <= 1.10 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
