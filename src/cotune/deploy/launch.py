"""The deployment commands: ``serve`` (the server of a gRPC run), ``device`` (one device
process), ``launch`` (a server and every device as local processes: a real multi-process run on
one machine, with TLS and per-device tokens made for it), and ``make_certs``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cotune.deploy.procs import start_cotune, warm
from cotune.deploy.security import Security, token_hash
from cotune.errors import ConfigError, PeerUnavailable

log = logging.getLogger(__name__)
# Called with the server's address once it listens (``launch`` starts its devices there).
ON_LISTEN: list[Callable[[str], None]] = []


def security_of(engine: Any) -> Security:
    return Security(
        tls_dir=Path(engine.tls_dir) if engine.tls_dir else None,
        mutual=engine.mutual_tls,
        insecure=engine.insecure,
    )


def read_tokens(path: str | None) -> dict[str, str] | None:
    """``tokens_file``: device id → SHA-256 hex of its token (YAML or JSON)."""
    if path is None:
        return None
    from cotune.config.loading import load_yaml_file

    data = load_yaml_file(path, "engine.tokens_file")
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in data.items()
    ):
        raise ConfigError(
            f"engine.tokens_file: {path} must map device ids to SHA-256 hex digests "
            "(`cotune certs` writes one)"
        )
    return data


def deployed_grid(exp: Any) -> Any:
    """The grid of a gRPC run (listen, wait for every device) or a Ray run (start the host
    actors, wait for them to build their nodes); no role is started yet."""
    from cotune.deploy.server import GrpcEngine
    from cotune.nodes import RemoteNodes
    from cotune.runtime.engine_grid import EngineGrid
    from cotune.runtime.ids import device_id

    eng = exp.cfg.engine
    devices = [device_id(i) for i in range(len(exp.parts))]
    if eng.kind == "ray":
        from cotune.deploy.raynodes import RayHub, check_host_memory, place

        profiles = {d: exp.sim.profiles[d].name for d in devices if d in exp.sim.profiles}
        placement = place(devices, eng.ray.hosts, eng.ray.placement, profiles)
        if eng.ray.memory_per_host_gb is not None:
            check_host_memory(exp, placement, eng.ray.memory_per_host_gb)
        hub: Any = RayHub(eng, devices, welcome(exp), placement)
    else:
        from cotune.deploy.transport import Hub

        hub = Hub(eng.listen, security_of(eng), read_tokens(eng.tokens_file), welcome(exp))
    engine = GrpcEngine(hub, codec=eng.codec, timeout_s=eng.request_timeout_s)
    engine.add_listener(exp.sim.clock.on_transfer)
    exp.engine = engine
    log.info("%s %s; waiting for %d devices",
             "started" if eng.kind == "ray" else "listening on", hub.address, len(devices))  # fmt: skip
    for hook in ON_LISTEN if eng.kind == "grpc" else []:
        hook(hub.address)
    missing = hub.wait_for(devices, eng.join_timeout_s)
    quorum = eng.join_quorum
    if missing and quorum is not None and len(devices) - len(missing) >= quorum:
        log.warning(
            "starting with %d of %d devices (engine.join_quorum %d); away until they connect: %s",
            len(devices) - len(missing), len(devices), quorum, ", ".join(missing[:10]),
        )  # fmt: skip
        engine.absent.update(missing)
    elif missing:
        hub.close()
        failed = [hub.failed[n] for n in missing if n in hub.failed]
        if failed:
            raise PeerUnavailable("; ".join(failed[:5]))
        raise PeerUnavailable(
            f"{len(missing)} device(s) did not join within {eng.join_timeout_s:.0f} s "
            f"(engine.join_timeout_s): {', '.join(missing[:5])}"
        )
    grid = EngineGrid(engine, RemoteNodes(exp, engine), exp.sim.flops)
    engine.grid = grid
    return grid


def welcome(exp: Any) -> dict[str, Any]:
    """What a joining device is told: the run's config and, for a device that brings its own
    data, the run's label/domain names (its ids) and the tokenizer the server trained, if any;
    the chat template's text when the config names a file (the device may not have it); the
    digest of the server's base and the library releases that made it (the device compares)."""
    from cotune.models.digest import library_versions

    tok = exp.tokenizer
    chat = tok.chat if tok is not None else None
    return {
        "base": exp.base_digest,
        "versions": library_versions(),
        "config": exp.cfg.to_dict(),
        "labels": exp.data.label_names,
        "domains": exp.data.domain_names,
        "tokenizer": tok.bpe.to_str() if tok is not None and tok.bpe is not None else None,
        "chat_template": chat.template if chat is not None else None,
    }


def make_certs(out: Path, devices: list[str], hosts: list[str]) -> Path:
    """A self-signed CA, a server certificate for ``hosts`` and one certificate per device
    (common name = its id), plus a token per device (``<id>.token``) and their hashes
    (``tokens.yaml``, for ``engine.tokens_file``). For tests and trials, not production PKI."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: Any, cert: Any) -> None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
        (out / f"{stem}.key").chmod(0o600)
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("cotune test CA")).issuer_name(name("cotune test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    write("ca", ca_key, ca)

    def leaf(cn: str, sans: list[x509.GeneralName]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
        )  # fmt: skip
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    write("server", *leaf(hosts[0] if hosts else "localhost", sans))
    hashes_out = {}
    for d in devices:
        write(d, *leaf(d, [x509.DNSName(d)]))
        token = secrets.token_urlsafe(24)
        (out / f"{d}.token").write_text(token + "\n")
        (out / f"{d}.token").chmod(0o600)
        hashes_out[d] = token_hash(token)
    (out / "tokens.yaml").write_text(json.dumps(hashes_out, indent=2) + "\n")
    return out


def device_files(data_dir: Path, devices: list[str]) -> dict[str, Path]:
    """``device-N.jsonl`` (or .csv / .tsv, optionally .gz) in ``data_dir``, one per device."""
    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir: {data_dir} is not a directory")
    out, missing = {}, []
    for d in devices:
        found = sorted(
            p for p in data_dir.glob(f"{d}.*") if p.name.split(".", 1)[1].removesuffix(".gz")
            in ("jsonl", "csv", "tsv")
        )  # fmt: skip
        if len(found) > 1:
            raise ConfigError(f"--data-dir: {d} has several files: {', '.join(map(str, found))}")
        if found:
            out[d] = found[0]
        else:
            missing.append(d)
    if missing:
        raise ConfigError(
            f"--data-dir: no {missing[0]}.jsonl/.csv/.tsv in {data_dir} "
            f"({len(missing)} of {len(devices)} devices have no file)"
        )
    return out


def launch(
    cfg: Any, *, quiet: bool = False, overwrite: bool | None = None, out_root: Any = None,
    data_dir: Path | None = None,
    wrap: Callable[[str, str], tuple[list[str], str]] | None = None,
    device_env: dict[str, str] | None = None,
    server_hosts: tuple[str, ...] = (),
    report: bool = True,
    devices_per_process: int = 1,
) -> Path:  # fmt: skip
    """Run ``cfg`` for real on this machine: this process serves, every device is its own
    process (TLS and per-device tokens made for the run unless the config names its own), or
    with ``devices_per_process`` N, consecutive devices share a process N at a time (one frozen
    base; each still dials, authenticates and exchanges as itself).
    With ``data_dir``, device N trains on its own ``device-N.jsonl`` there. ``wrap(device,
    address)`` gives a command prefix and the address that device dials (``netlab``: its own
    network namespace and shaped link; ``server_hosts``: the names it dials, for the server's
    certificate); ``device_env`` adds to the devices' environment; ``report``: write the
    HTML report (the CLI always does)."""
    from cotune.run import run_experiment
    from cotune.runtime.ids import device_id

    devices = [device_id(i) for i in range(cfg.devices.count)]
    if devices_per_process < 1:
        raise ConfigError(f"--devices-per-process: must be >= 1, got {devices_per_process}")
    if devices_per_process > 1 and (data_dir is not None or wrap is not None):
        what = "--data-dir (a device's own file)" if data_dir is not None else "a wrapped device"
        raise ConfigError(
            f"--devices-per-process {devices_per_process}: {what} needs a process per device"
        )
    groups = [
        devices[i : i + devices_per_process] for i in range(0, len(devices), devices_per_process)
    ]
    files = device_files(Path(data_dir), devices) if data_dir is not None else {}
    tmp = Path(tempfile.mkdtemp(prefix="cotune-launch-"))
    eng = cfg.engine
    update: dict[str, Any] = {"kind": "grpc"}
    if ":" not in eng.listen or eng.listen.endswith(":50051"):
        update["listen"] = "127.0.0.1:0"  # a free port
    if not eng.insecure and eng.tls_dir is None:
        make_certs(tmp / "tls", devices, ["localhost", "127.0.0.1", *server_hosts])
        update.update(tls_dir=str(tmp / "tls"), tokens_file=str(tmp / "tls" / "tokens.yaml"))
    cfg = cfg.model_copy(update={"engine": eng.model_copy(update=update)})
    procs: list[Any] = []
    if wrap is None:
        warm()  # the devices' forkserver imports torch while this process builds the run

    def start_devices(address: str) -> None:
        tls = cfg.engine.tls_dir
        for group in groups:
            d = group[0]
            prefix, dial = wrap(d, address) if wrap is not None else ([], address)
            argv = ["device", "--server", dial]
            for node in group:
                argv += ["--id", node]
            argv += ["--tls", tls] if tls else ["--insecure"]
            if cfg.engine.mutual_tls:
                argv.append("--mutual-tls")
            if d in files:
                argv += ["--data", str(files[d])]
            env = dict(os.environ)
            # Device processes share this machine's cores: idle OpenMP threads must sleep,
            # not spin (the default busy-wait steals the core the active process needs). They
            # keep the server's thread count: a matmul's rounding depends on it, and a launched
            # run equals the in-process engines bit for bit only with the same count.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            env.update(device_env or {})
            tokens = [Path(tls) / f"{n}.token" for n in group] if tls else []
            if len(group) > 1:
                env.pop("COTUNE_TOKEN", None)  # one token cannot serve several devices
                if tokens and all(t.is_file() for t in tokens):
                    argv += ["--token-dir", tls]  # the tokens made for the run, one per device
            elif tokens and tokens[0].is_file():
                env["COTUNE_TOKEN"] = tokens[0].read_text().strip()
            procs.append(start_cotune(argv, env, tmp / f"{d}.log", prefix))

    ON_LISTEN.append(start_devices)
    try:
        return run_experiment(cfg, quiet=quiet, overwrite=overwrite, out_root=out_root,
                              report=report)  # fmt: skip
    finally:
        ON_LISTEN.remove(start_devices)
        failed = []
        for d, p in zip((g[0] for g in groups), procs):
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # forked devices raise it too (procs.ForkedDevice)
                p.kill()
                rc = p.wait()
            if rc != 0:
                failed.append(d)
        for d in failed:
            tail = (tmp / f"{d}.log").read_text()[-2000:]
            log.error("device process %s failed:\n%s", d, tail)
