"""The ``cotune`` command. One typed function per subcommand; flags map onto config fields.

Start-up stays cheap: this module imports only the standard library, pyyaml and pydantic.
torch, transformers and peft are imported inside the commands that train or load models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cotune import __version__
from cotune.cli_commands import (
    compare_command,
    datasets_command,
    devices_command,
    export_command,
    infer_command,
    mixture_command,
    report_command,
    run_command,
)
from cotune.cli_deploy import certs_command, device_command, launch_command, serve_command
from cotune.errors import CotuneError, Interrupted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cotune",
        description="Fine-tune LLMs across a cloud server and many devices, and measure what each way costs.",
    )
    p.add_argument("--version", action="version", version=f"cotune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_set(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set train.lr=3e-4 (repeatable)",
        )

    r = sub.add_parser("run", help=run_command.__doc__, description=run_command.__doc__)
    r.add_argument("config", type=Path)
    add_set(r)
    r.add_argument(
        "--out", type=Path, default=None, help="parent of the run directory (default: output.dir)"
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress (the result is still printed)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and what the run will cost (from a short probe); write nothing")  # fmt: skip

    c = sub.add_parser("compare", help=compare_command.__doc__, description=compare_command.__doc__)
    c.add_argument("configs", type=Path, nargs="+")
    add_set(c)
    c.add_argument("--out", type=Path, default=Path("runs/compare"))
    c.add_argument("--overwrite", action="store_true")
    c.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs that finished, continue the unfinished ones from their checkpoints",
    )
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run each config with N seeds (seed, seed+1, ...) and report mean ± 95%% CI")  # fmt: skip
    c.add_argument("--dry-run", action="store_true",
                   help="each config's resolved form and estimated cost; run nothing")  # fmt: skip

    rp = sub.add_parser("report", help=report_command.__doc__, description=report_command.__doc__)
    rp.add_argument("run_dirs", type=Path, nargs="+")
    rp.add_argument(
        "--out", type=Path, default=None, help="where a comparison of several runs goes"
    )

    e = sub.add_parser("export", help=export_command.__doc__, description=export_command.__doc__)
    e.add_argument("run_dir", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument(
        "--merge", action="store_true", help="merge the adapter into the base and save full weights"
    )
    e.add_argument(
        "--role", default=None, help="which role's adapter when the run has several (e.g. device-3)"
    )
    e.add_argument("--overwrite", action="store_true")

    def add_security(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--tls", type=Path, default=None, help="directory of ca.pem, server/device certs"
        )
        sp.add_argument("--mutual-tls", action="store_true", help="devices present certificates")
        sp.add_argument(
            "--insecure", action="store_true", help="plain text: a trusted network only"
        )

    sv = sub.add_parser("serve", help=serve_command.__doc__, description=serve_command.__doc__)
    sv.add_argument("config", type=Path)
    add_set(sv)
    sv.add_argument("--listen", default=None, help="HOST:PORT (default: engine.listen)")
    add_security(sv)
    sv.add_argument("--tokens", type=Path, default=None, help="device id -> token SHA-256 (YAML)")
    sv.add_argument("--out", type=Path, default=None)
    sv.add_argument("--overwrite", action="store_true")
    sv.add_argument("--resume", action="store_true")
    sv.add_argument("--quiet", action="store_true")

    d = sub.add_parser("device", help=device_command.__doc__, description=device_command.__doc__)
    d.add_argument("--server", required=True, help="HOST:PORT of `cotune serve`")
    d.add_argument("--id", required=True, dest="nodes", action="append",
                   help="this device's id, e.g. device-3; repeat to host several devices in "
                        "this process (one frozen base for all)")  # fmt: skip
    add_security(d)
    d.add_argument("--token", default=None, help="this device's token (default: $COTUNE_TOKEN)")
    d.add_argument("--token-dir", type=Path, default=None,
                   help="a directory of <id>.token files (`cotune certs` output): each device's "
                        "token")  # fmt: skip
    d.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the server to listen and welcome this device "
                        "(a device may start first)")  # fmt: skip
    d.add_argument("--retry", type=float, default=0.0,
                   help="keep reconnecting this many seconds after a lost connection")  # fmt: skip
    d.add_argument("--data", type=Path, default=None,
                   help="this device's own training data (JSONL/CSV/TSV with the run's "
                        "data.text_field/label_field); default: its shard of the config's data")  # fmt: skip

    la = sub.add_parser("launch", help=launch_command.__doc__, description=launch_command.__doc__)
    la.add_argument("config", type=Path)
    add_set(la)
    la.add_argument("--out", type=Path, default=None)
    la.add_argument("--overwrite", action="store_true")
    la.add_argument("--quiet", action="store_true")
    la.add_argument("--insecure", action="store_true", help="no TLS (default: made for the run)")
    la.add_argument("--data-dir", type=Path, default=None,
                    help="device-N.jsonl/.csv/.tsv files: each device trains on its own file")  # fmt: skip
    la.add_argument("--devices-per-process", type=int, default=1,
                    help="host this many devices in each device process (one frozen base for "
                         "them; fewer processes than cores keeps them from contending)")  # fmt: skip

    ce = sub.add_parser("certs", help=certs_command.__doc__, description=certs_command.__doc__)
    ce.add_argument("out", type=Path)
    ce.add_argument("--devices", type=int, default=4)
    ce.add_argument("--host", dest="hosts", action="append", default=[],
                    help="a name or IP of the server (repeatable; default localhost, 127.0.0.1)")  # fmt: skip

    mx = sub.add_parser(
        "mixture", help=mixture_command.__doc__, description=mixture_command.__doc__
    )
    mx.add_argument("config", type=Path)
    add_set(mx)
    mx.add_argument("--budget-flops", type=float, default=None,
                    help="FLOPs per search method (default: mixture.budget_flops)")  # fmt: skip
    mx.add_argument("--out", type=Path, default=None,
                    help="where to write (default <output.dir>/<name>-mixture); an existing "
                         "search there is resumed")  # fmt: skip

    inf = sub.add_parser("infer", help=infer_command.__doc__, description=infer_command.__doc__)
    inf.add_argument("run_dir", type=Path)
    inf.add_argument("--prompt", required=True)
    inf.add_argument("--max-new-tokens", type=int, default=32)
    inf.add_argument(
        "--gamma", type=int, default=4, help="tokens drafted per cloud round (0: none)"
    )
    inf.add_argument(
        "--cut", default="1,1", help="N_IN,N_OUT: blocks on the device before/after the cloud"
    )
    inf.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    inf.add_argument(
        "--prefill-chunk", default="auto", help="positions per upload, 'auto' or 'none'"
    )
    inf.add_argument(
        "--drafter-steps", type=int, default=200, help="distillation steps (first use)"
    )
    inf.add_argument("--device-profile", default="phone-mid")
    inf.add_argument("--cloud-profile", default="a100")
    inf.add_argument("--role", default=None, help="which role's adapter when the run has several")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--raw-prompt", action="store_true",
                     help="the prompt's text as given, not in the run's chat template")  # fmt: skip
    inf.add_argument("--serial-drafting", action="store_true",
                     help="no parallel drafting (drafting waits for each verification)")  # fmt: skip
    inf.add_argument(
        "--json", type=Path, default=None, dest="json_out", help="also write the result here"
    )

    sub.add_parser("datasets", help=datasets_command.__doc__, description=datasets_command.__doc__)
    dv = sub.add_parser(
        "devices", help=devices_command.__doc__, description=devices_command.__doc__
    )
    dv.add_argument("--profile-file", type=Path, default=None, help="a YAML file of extra profiles")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.command == "run":
            return run_command(
                args.config,
                args.overrides,
                overwrite=args.overwrite,
                resume=args.resume,
                quiet=args.quiet,
                out=args.out,
                dry_run=args.dry_run,
            )
        if args.command == "compare":
            return compare_command(
                args.configs,
                args.overrides,
                out=args.out,
                overwrite=args.overwrite,
                quiet=args.quiet,
                resume=args.resume,
                dry_run=args.dry_run,
                seeds=args.seeds,
            )
        if args.command == "report":
            return report_command(args.run_dirs, out=args.out)
        if args.command == "export":
            return export_command(
                args.run_dir, args.out, merge=args.merge, role=args.role, overwrite=args.overwrite
            )
        if args.command == "serve":
            return serve_command(
                args.config, args.overrides, listen=args.listen, tls=args.tls,
                mutual_tls=args.mutual_tls, tokens=args.tokens, insecure=args.insecure,
                overwrite=args.overwrite, resume=args.resume, quiet=args.quiet, out=args.out,
            )  # fmt: skip
        if args.command == "device":
            return device_command(
                args.server, args.nodes, tls=args.tls, mutual_tls=args.mutual_tls,
                insecure=args.insecure, token=args.token, timeout=args.timeout, retry=args.retry,
                data=args.data, token_dir=args.token_dir,
            )  # fmt: skip
        if args.command == "launch":
            return launch_command(
                args.config, args.overrides, overwrite=args.overwrite, quiet=args.quiet,
                out=args.out, insecure=args.insecure, data_dir=args.data_dir,
                devices_per_process=args.devices_per_process,
            )  # fmt: skip
        if args.command == "certs":
            return certs_command(args.out, devices=args.devices, hosts=args.hosts)
        if args.command == "mixture":
            return mixture_command(
                args.config, args.overrides, budget_flops=args.budget_flops, out=args.out
            )
        if args.command == "infer":
            from cotune.infer.command import InferOptions, parse_cut

            n_in, n_out = parse_cut(args.cut)
            chunk = args.prefill_chunk
            chunk = None if chunk == "none" else chunk if chunk == "auto" else int(chunk)
            opts = InferOptions(
                args.prompt, args.max_new_tokens, args.gamma, n_in, n_out, args.temperature,
                chunk, args.drafter_steps, args.device_profile, args.cloud_profile, args.role,
                args.seed, parallel_drafting=not args.serial_drafting, raw_prompt=args.raw_prompt,
            )  # fmt: skip
            return infer_command(args.run_dir, opts, json_out=args.json_out)
        if args.command == "datasets":
            return datasets_command()
        if args.command == "devices":
            return devices_command(args.profile_file)
    except Interrupted as exc:
        print(f"cotune: {exc}", file=sys.stderr)
        return 130
    except CotuneError as exc:
        print(f"cotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a run (loading, reporting): nothing was left half-done
        print("cotune: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
