"""The ``cotune`` commands of a real deployment: ``serve``, ``device``, ``launch``, ``certs``
(one typed function each; ``cotune.cli`` builds their parsers). Like the rest of the command
line, this module imports only the standard library; the commands import what they run."""

from __future__ import annotations

from pathlib import Path

from cotune.errors import ConfigError


def _deploy_overrides(
    listen: str | None, tls: Path | None, mutual_tls: bool, tokens: Path | None, insecure: bool
) -> list[str]:
    out = ["engine.kind=grpc"]
    if listen:
        out.append(f"engine.listen={listen}")
    if tls:
        out.append(f"engine.tls_dir={tls}")
    if mutual_tls:
        out.append("engine.mutual_tls=true")
    if tokens:
        out.append(f"engine.tokens_file={tokens}")
    if insecure:
        out.append("engine.insecure=true")
    return out


def serve_command(
    config: Path, overrides: list[str], *, listen: str | None, tls: Path | None,
    mutual_tls: bool, tokens: Path | None, insecure: bool, overwrite: bool, resume: bool,
    quiet: bool, out: Path | None,
) -> int:  # fmt: skip
    """Serve CONFIG's run over gRPC: wait for its devices (`cotune device`), run, write the run directory."""
    from cotune.config import load_config
    from cotune.run import run_experiment

    deploy = _deploy_overrides(listen, tls, mutual_tls, tokens, insecure)
    cfg = load_config(config, [*overrides, *deploy])
    run_dir = run_experiment(cfg, out_root=out, overwrite=overwrite, resume=resume, quiet=quiet)
    from cotune.cli_commands import print_summary

    print_summary(run_dir, quiet)
    return 0


def device_command(
    server: str, nodes: list[str], *, tls: Path | None, mutual_tls: bool, insecure: bool,
    token: str | None, timeout: float, retry: float, data: Path | None = None,
    token_dir: Path | None = None,
) -> int:  # fmt: skip
    """Run devices of a served run: dial SERVER as each device ID and train until the run ends
    (several IDs: one process and one frozen base for all of them)."""
    from cotune.deploy.connect import run_device
    from cotune.deploy.security import Security

    credentials = device_tokens(nodes, token, token_dir)
    security = Security(tls_dir=tls, mutual=mutual_tls, insecure=insecure)
    run_device(server, credentials, security, connect_timeout=timeout, retry_s=retry,
               data_file=data)  # fmt: skip
    print(f"{', '.join(nodes)}: the run is over")
    return 0


def device_tokens(nodes: list[str], token: str | None, token_dir: Path | None) -> dict[str, str]:
    """Each device id's token: ``--token-dir``'s ``<id>.token`` files (what `cotune certs`
    writes), else ``--token`` / ``$COTUNE_TOKEN`` for a single device."""
    import os

    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"--id: a device given twice ({', '.join(nodes)})")
    if token_dir is not None:
        out = {}
        for node in nodes:
            path = token_dir / f"{node}.token"
            try:
                out[node] = path.read_text().strip()
            except OSError as err:
                raise ConfigError(f"--token-dir: cannot read {path}: {err.strerror}") from None
        return out
    if len(nodes) > 1 and (token or os.environ.get("COTUNE_TOKEN")):
        raise ConfigError("--token: one token cannot serve several --id; give --token-dir")
    return {node: token or os.environ.get("COTUNE_TOKEN", "") for node in nodes}


def launch_command(
    config: Path, overrides: list[str], *, overwrite: bool, quiet: bool, out: Path | None,
    insecure: bool, data_dir: Path | None = None, devices_per_process: int = 1,
) -> int:  # fmt: skip
    """Run CONFIG for real on this machine: a gRPC server and every device as its own process."""
    from cotune.config import load_config
    from cotune.deploy.launch import launch

    extra = ["engine.insecure=true"] if insecure else []
    cfg = load_config(config, [*overrides, *extra])
    run_dir = launch(cfg, quiet=quiet, overwrite=overwrite, out_root=out, data_dir=data_dir,
                     devices_per_process=devices_per_process)  # fmt: skip
    from cotune.cli_commands import print_summary

    print_summary(run_dir, quiet)
    return 0


def certs_command(out: Path, *, devices: int, hosts: list[str]) -> int:
    """Make a test CA, a server certificate, device certificates and tokens in OUT."""
    from cotune.deploy.launch import make_certs

    ids = [f"device-{i}" for i in range(devices)]
    make_certs(out, ids, hosts or ["localhost", "127.0.0.1"])
    print(f"certificates and tokens for {devices} devices in {out} (engine.tokens_file: "
          f"{out / 'tokens.yaml'}; device tokens: {out}/device-N.token)")  # fmt: skip
    return 0
