"""HAT serving over the Grid (issue 16): devices generate U-shaped through a cloud role.

The protocol of ``cotune infer`` (``cotune.infer``), with every party a role on its own node:

- the **cloud** (``ServingCloud``, on the server node) holds the middle blocks and one key/value
  cache per device; its one handler, ``middle``, runs the middle over the positions a device
  uploads, after cutting that device's cache back to the position sent (a rejected draft's
  positions undone; position 0 opens a fresh session);
- each **device** (``ServingDevice``) holds the embeddings, its input and output blocks, the
  head and the drafter; asked to ``generate``, it takes a prompt from its own text, prefills
  (in chunks), then drafts ``gamma`` tokens, uploads their input-block hidden states with a
  nested ``middle`` request, verifies with its output blocks by the speculative rule and rolls
  its caches back: the cloud never sees a token or a next-token distribution.

The driver only sends each device its drafter once (``load``: the bytes a real device
downloads) and asks for one generation per device per step (``train.steps`` requests each),
one device at a time, so each figure is one device's own latency. A device reports what its
generation took (``generated``): the tokens, drafts and acceptances, the encoded bytes of its
uploads and downloads, and host seconds to each token measured on its own node (over gRPC,
real round trips). FLOPs are counted as they run on both sides and reported to each node's
meter, so the simulator puts the work on the fleet's profiles like any run's.

Outputs: ``serving.json`` (every request, token ids and times) and ``serving.csv`` in the run
directory; the summary's final figures are the acceptance rate, bytes per token and cloud
rounds per token (exact, the same on every engine); host timing means are in ``extra``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from cotune.errors import ConfigError, CotuneError, ProtocolError
from cotune.infer.drafter import DRAFTER_DIR, load_drafter
from cotune.infer.generate import UGenerator
from cotune.infer.plan import declared_profile, plan_prefill_chunk
from cotune.infer.speculative import MiddleAdapter, Sampling
from cotune.infer.split import CloudMiddle, GridLink, UCut
from cotune.paradigms.base import Experiment, ParadigmResult, parse_options, reply
from cotune.paradigms.options import HatServeOptions
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train import RoleState

log = logging.getLogger(__name__)

#: Per-request fields written to serving.csv (serving.json has these and the token lists).
CSV_FIELDS = (
    "device", "request", "ok", "prompt_tokens", "new_tokens", "drafted", "accepted",
    "cloud_rounds", "bytes_up", "bytes_down", "bytes_per_token", "device_flops",
    "host_ttft_s", "host_tbt_s", "error",
)  # fmt: skip


class ServingCloud(Role):
    """The cloud: the middle blocks, one cache per device. A malformed upload (wrong shape,
    non-finite, a position it never held) is answered ``middle_error`` with the reason: the
    device learns why, the cloud and the other devices' sessions carry on."""

    def __init__(self, ctx: NodeContext, cut: UCut) -> None:
        super().__init__(ctx.node_id)
        self.ctx = ctx
        self.middle = CloudMiddle(ctx.model.loaded.anatomy, cut)
        self.refused = 0

    def on_middle(self, msg: Message) -> Message:
        model = self.ctx.model.loaded.model
        was = model.training
        model.eval()  # no dropout in serving
        try:
            out, flops = self.middle.counted_middle(True, msg)
        except ProtocolError as err:
            self.refused += 1
            log.warning("refused an upload from %s: %s", msg.sender, err)
            return reply(msg, "middle_error", error=str(err))
        finally:
            model.train(was)
        self.ctx.meter.compute(flops, round=int(msg.meta.get("round", 0)), after=msg.arrival,
                               label="middle")  # fmt: skip
        out.meta["round"] = msg.meta.get("round", 0)
        return out

    def measurements(self) -> dict[str, float]:
        return {"refused_uploads": float(self.refused)}


class ServingDevice(Role):
    """A device: its ends of the model, the drafter, prompts from its own text."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        if ctx.data is None or len(ctx.data) == 0:
            raise RuntimeError(f"{ctx.node_id} holds no text to take prompts from")
        self.ctx, self.data = ctx, ctx.data
        self.opts = parse_options(HatServeOptions, ctx.cfg.paradigm.options)
        anatomy = ctx.model.loaded.anatomy
        self.cut = UCut(self.opts.n_in, self.opts.n_out)
        self.drafter = MiddleAdapter(anatomy.hidden_size).to(ctx.device).eval()
        chunk = self.opts.prefill_chunk if self.opts.prefill_chunk != "auto" else None
        self.gen = UGenerator(anatomy, self.cut, drafter=self.drafter, gamma=self.opts.gamma,
                              prefill_chunk=chunk,
                              codec=ctx.cfg.engine.activation_codec)  # fmt: skip
        self.last_arrival: float | None = None

    def on_load(self, msg: Message) -> Message:
        """The drafter's weights (the server's copy: what a device downloads once)."""
        own = self.drafter.state_dict()
        if set(msg.tensors) != set(own) or any(msg.tensors[k].shape != own[k].shape for k in own):
            raise ProtocolError(f"{msg.describe()}: not a drafter for hidden size "
                                f"{self.drafter.up.in_features}")  # fmt: skip
        self.drafter.load_state_dict({k: v.to(self.ctx.device) for k, v in msg.tensors.items()})
        return reply(msg, "loaded")

    def on_plan(self, msg: Message) -> Message:
        """The prefill chunk size the server chose for this device (``prefill_chunk: auto``)."""
        chunk = msg.meta.get("prefill_chunk")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ProtocolError(f"{msg.describe()}: meta.prefill_chunk must be an int >= 1")
        self.gen.prefill_chunk = chunk
        return reply(msg, "planned")

    def snapshot(self) -> RoleState:
        """The drafter it holds (a resumed device needs no second download)."""
        return RoleState(
            params={k: v.detach().clone() for k, v in self.drafter.state_dict().items()}
        )

    def restore(self, state: RoleState | None) -> None:
        if state is not None:
            self.drafter.load_state_dict(state.params)

    def prompt(self, request: int) -> list[int]:
        """Request ``request``'s prompt: the first tokens of one of this device's texts (its
        end-of-text token dropped: a prompt is continued)."""
        ids = list(self.data.ids[(request - 1) % len(self.data)])
        pad = self.data.pad_id
        while ids and ids[-1] == pad:
            ids.pop()
        return ids[: self.opts.prompt_tokens]

    def on_generate(self, msg: Message) -> Message:
        request = int(msg.meta["request"])
        eos = msg.meta.get("eos")
        prompt = self.prompt(request)
        if prompt and eos is not None and prompt[-1] == eos and len(prompt) > 1:
            prompt = prompt[:-1]
        meter = self.ctx.meter
        self.last_arrival = msg.arrival  # device work waits for the latest message it got

        def on_reply(m: Message) -> None:
            self.last_arrival = m.arrival

        def on_flops(flops: int) -> None:
            meter.compute(flops, round=request, after=self.last_arrival, label="hat device")

        link = GridLink(self.ctx.grid, self.ctx.cfg.engine.activation_codec, on_reply)
        model = self.ctx.model.loaded.model
        was = model.training
        model.eval()
        started = time.perf_counter()
        try:
            out = self.gen.generate(
                prompt, self.opts.max_new_tokens, Sampling(self.opts.temperature),
                seed=self.ctx.seed * 1_000_003 + request, eos_token_id=eos, link=link,
                role_id=self.role_id, on_device_flops=on_flops,
            )  # fmt: skip
        except CotuneError as err:  # the cloud refused (ProtocolError), or it went away
            return reply(msg, "generated", ok=False, request=request, error=str(err),
                         prompt=prompt, host_wall_s=time.perf_counter() - started)  # fmt: skip
        finally:
            model.train(was)
        s = out.link
        return reply(
            msg, "generated", ok=True, request=request, prompt=prompt, tokens=out.tokens,
            drafted=out.drafted, accepted=out.accepted, cloud_rounds=len(s.sizes),
            bytes_up=s.bytes_up, bytes_down=s.bytes_down, messages=s.messages,
            device_flops=sum(t.device_before + t.device_after + t.after_token for t in out.trace),
            host_token_times_s=out.token_times,
        )  # fmt: skip


def resolve_drafter(where: str, cut: UCut, hidden_size: int) -> MiddleAdapter:
    """The drafter at ``where``: its directory, or a run directory holding one for ``cut``."""
    path = Path(where).expanduser()
    field = "paradigm.options.drafter"
    for d in (path, path / DRAFTER_DIR / f"cut-{cut.n_in}-{cut.n_out}"):
        if (d / "drafter.json").is_file():
            found = load_drafter(d, cut, hidden_size)
            if found is None:
                meta = json.loads((d / "drafter.json").read_text(encoding="utf-8"))
                raise ConfigError(
                    f"{field}: {d} holds a drafter for cut {meta.get('cut')} and hidden size "
                    f"{meta.get('hidden_size')}; this run needs cut {cut.n_in},{cut.n_out} and "
                    f"hidden size {hidden_size}"
                )
            return found
    raise ConfigError(
        f"{field}: no drafter at {path} (expected drafter.json there, or a run directory with "
        f"{DRAFTER_DIR}/cut-{cut.n_in}-{cut.n_out}/)"
    )


def preflight(exp: Experiment) -> None:
    """The cut and the drafter, checked before any file is written."""
    opts = parse_options(HatServeOptions, exp.cfg.paradigm.options)
    cut = UCut(opts.n_in, opts.n_out)
    anatomy = exp.model.loaded.anatomy
    cut.check(anatomy.num_layers)
    if opts.drafter is not None:
        resolve_drafter(opts.drafter, cut, anatomy.hidden_size)


def plan_chunks(exp: Experiment, devices: list[str], cut: UCut, opts: HatServeOptions) -> dict:
    """HAT's per-device prefill chunk: chosen on the server from each device's declared speeds
    and its own (``cotune.infer.plan``), sent to the device (``plan``). A resumed run plans
    and sends again (a few bytes more than the uninterrupted run)."""
    grid, cfg = exp.grid, exp.cfg
    anatomy = grid.context(SERVER).model.loaded.anatomy
    cloud = declared_profile(SERVER, grid.node_info(SERVER))
    chosen: dict[str, dict[str, Any]] = {}
    model = anatomy.model
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):  # planning leaves the run's random stream be
            for d in devices:
                device = declared_profile(d, grid.node_info(d))
                chunk, ttfts = plan_prefill_chunk(anatomy, cut, opts.prompt_tokens, device,
                                                  cloud, cfg.engine.activation_codec)  # fmt: skip
                chosen[d] = {"chunk": chunk, "profile": device.name,
                             "predicted_ttft_s": {str(k): v for k, v in ttfts.items()}}  # fmt: skip
                if exp.resume is None:
                    exp.log_record("plan", 0, d, prefill_chunk=chunk,
                                   predicted_ttft_s=ttfts[chunk])  # fmt: skip
    finally:
        model.train(was)
    grid.request_many(
        [Message("plan", SERVER, d, {}, {"prefill_chunk": chosen[d]["chunk"]}) for d in devices],
        together=True,
    )
    return chosen


def request_row(device: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One request's figures, from its device's report."""
    times = meta.get("host_token_times_s") or []
    new = len(meta.get("tokens") or [])
    up, down = meta.get("bytes_up", 0), meta.get("bytes_down", 0)
    return {
        "device": device, "request": meta["request"], "ok": bool(meta.get("ok")),
        "prompt_tokens": len(meta.get("prompt") or []), "new_tokens": new,
        "drafted": meta.get("drafted", 0), "accepted": meta.get("accepted", 0),
        "cloud_rounds": meta.get("cloud_rounds", 0), "bytes_up": up, "bytes_down": down,
        "bytes_per_token": (up + down) / new if new else None,
        "device_flops": meta.get("device_flops", 0),
        "host_ttft_s": times[0] if times else None,
        "host_tbt_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
        "error": meta.get("error"),
        "prompt": meta.get("prompt"), "tokens": meta.get("tokens"),
        "host_token_times_s": times,
    }  # fmt: skip


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The run's serving figures (exact: the same on every engine)."""
    ok = [r for r in rows if r["ok"]]
    tokens = sum(r["new_tokens"] for r in ok)
    drafted = sum(r["drafted"] for r in ok)
    nbytes = sum(r["bytes_up"] + r["bytes_down"] for r in ok)
    return {
        "requests": float(len(rows)),
        "failed_requests": float(len(rows) - len(ok)),
        "new_tokens": float(tokens),
        "acceptance_rate": sum(r["accepted"] for r in ok) / drafted if drafted else float("nan"),
        "bytes_per_token": nbytes / tokens if tokens else float("nan"),
        "cloud_rounds_per_token": sum(r["cloud_rounds"] for r in ok) / tokens
        if tokens
        else float("nan"),
    }


def host_means(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean host TTFT and TBT over the requests that have them (measurements: vary run to run)."""

    def avg(key: str) -> float | None:
        vals = [r[key] for r in rows if r["ok"] and r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {"host_ttft_s": avg("host_ttft_s"), "host_tbt_s": avg("host_tbt_s")}


def write_outputs(run_dir: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    (run_dir / "serving.json").write_text(
        json.dumps({**info, "requests": rows}, indent=1) + "\n", encoding="utf-8"
    )
    with (run_dir / "serving.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(HatServeOptions, cfg.paradigm.options)
    cut = UCut(opts.n_in, opts.n_out)
    ctx = grid.context(SERVER)
    anatomy = ctx.model.loaded.anatomy
    cut.check(anatomy.num_layers)
    cloud = ServingCloud(ctx, cut)
    grid.host(cloud)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, ServingDevice)
    if opts.drafter is not None:
        drafter = resolve_drafter(opts.drafter, cut, anatomy.hidden_size)
    else:  # untrained: its last layer is zero, so it skips the middle (an early exit)
        drafter = MiddleAdapter(anatomy.hidden_size)
    weights = {k: v.detach().cpu().contiguous() for k, v in drafter.state_dict().items()}
    # The model's adapter as initialised: what was served, saved so the run is self-contained.
    model_state = ctx.model.trainer.new_state(cfg.seed, ctx.model.initial_params())
    eos = getattr(exp.tokenizer, "eos_id", None)

    rows: list[dict[str, Any]] = []
    start = 0
    if exp.resume is not None:
        start = int(exp.resume["step"])
        rows = list(exp.resume["extra"]["requests"])
        for d in devices:
            grid.restore(d, exp.resume["states"].get(d))
    elif opts.gamma > 0:
        grid.request_many(
            [Message("load", SERVER, d, weights, {"round": start}) for d in devices], together=True
        )
    chunks = plan_chunks(exp, devices, cut, opts) if opts.prefill_chunk == "auto" else {}
    total = cfg.train.steps
    with exp.progress((total - start) * len(devices), f"hat_serve {cfg.name}", "request") as bar:
        for step in range(start + 1, total + 1):
            for d in devices:  # one at a time: each device's latency is its own
                meta = {"request": step, "round": step, "eos": eos}
                answer = grid.gather([grid.submit(Message("generate", SERVER, d, {}, meta),
                                                  round=step)]).replies[0]  # fmt: skip
                if answer.ok and answer.message is not None:
                    row = request_row(d, answer.message.meta)
                else:
                    row = request_row(d, {"request": step, "ok": False, "error": answer.error})
                if not row["ok"]:
                    log.warning("request %d of %s failed: %s", step, d, row["error"])
                rows.append(row)
                exp.log_record("generate", step, d, round=step, **{
                    k: row[k] for k in CSV_FIELDS if k not in ("device", "request")})  # fmt: skip
                bar.update(1, tokens=row["new_tokens"])
            exp.maybe_checkpoint(step, lambda: {**grid.snapshots(devices), SERVER: model_state},
                                 lambda: {"requests": list(rows)})  # fmt: skip
    final = totals(rows)
    write_outputs(exp.run_dir, rows, {
        "cut": [cut.n_in, cut.n_out], "gamma": opts.gamma, "drafter": opts.drafter,
        "codec": cfg.engine.activation_codec, "prefill_chunks": chunks, **final,
        **host_means(rows)})  # fmt: skip
    return ParadigmResult(
        states={SERVER: model_state},
        final_eval={**exp.evaluate_state(model_state), **final},
        extra={
            **host_means(rows),
            "serving_json": str(exp.run_dir / "serving.json"),
            **grid.measurements(SERVER),
        },  # fmt: skip
    )
