"""``cotune infer RUN_DIR --prompt ...``: generate with a run's fine-tuned model, cut U-shaped
between the device and the cloud, with an on-device drafter, and show what each token cost.

The drafter is distilled on the run's own training text the first time (``RUN_DIR/drafter/``,
reused afterwards for the same cut). Timing is given twice: host seconds on this machine, and
simulated seconds for a device profile talking to a cloud profile (the simulator's clock over
the counted FLOPs and encoded bytes of this very generation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cotune.errors import ConfigError, RunDirError
from cotune.infer.plan import choose_prefill_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOptions:
    prompt: str
    max_new_tokens: int = 32
    gamma: int = 4
    n_in: int = 1
    n_out: int = 1
    temperature: float = 0.0
    prefill_chunk: int | str | None = "auto"  # positions per upload, "auto", or None: whole
    drafter_steps: int = 200
    device_profile: str = "phone-mid"
    cloud_profile: str = "a100"
    role: str | None = None
    seed: int = 0
    codec: str = "fp32"
    parallel_drafting: bool = True
    # A run trained on conversations (data.chat_template) is prompted with one: the prompt as
    # the user's turn, the assistant's opened. True: the prompt's text as given.
    raw_prompt: bool = False


def parse_cut(text: str) -> tuple[int, int]:
    """``"1,2"`` → (1, 2): blocks on the device before and after the cloud's middle."""
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--cut: expected N_IN,N_OUT (e.g. 1,1), got {text!r}") from None
    return a, b


def _drafter(run_dir: Path, cfg: Any, loaded: Any, tokenizer: Any, cut: Any, opts: InferOptions):
    from cotune.data import encode_dataset, load_task_data
    from cotune.infer.drafter import (
        DRAFTER_DIR,
        DrafterTraining,
        load_drafter,
        save_drafter,
        train_drafter,
    )
    from cotune.progress import Progress

    where = run_dir / DRAFTER_DIR / f"cut-{cut.n_in}-{cut.n_out}"
    found = load_drafter(where, cut, loaded.anatomy.hidden_size)
    if found is not None or opts.drafter_steps == 0:
        return found
    data = load_task_data(cfg.data, cfg.model.task, cfg.seed)
    # As the run read them (instruction data as its conversations, when it had a template).
    seqs = encode_dataset(data.train, tokenizer, cfg.model.max_length, "causal_lm").ids
    train = DrafterTraining(steps=opts.drafter_steps, seed=opts.seed)
    with Progress(train.steps, "distilling the drafter", quiet=False) as bar:
        adapter, losses = train_drafter(
            loaded.anatomy, cut, seqs, train, on_step=lambda _s, loss: bar.update(1, loss=loss)
        )
    info = {"steps": train.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "texts": len(seqs), "training": asdict(train)}  # fmt: skip
    save_drafter(adapter, cut, where, info)
    return adapter


def infer(run_dir: Path, opts: InferOptions) -> dict[str, Any]:
    """Generate and return the result (also what ``--json`` writes)."""
    from cotune.export import adapter_dir_of, load_run_model
    from cotune.infer.generate import UGenerator
    from cotune.infer.speculative import Sampling
    from cotune.infer.split import UCut
    from cotune.infer.timeline import Timeline
    from cotune.sim.profiles import get_profile

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a cotune run directory (no config.yaml)")
    cfg, loaded, tokenizer, _ = load_run_model(run_dir, adapter_dir_of(run_dir, opts.role))
    if cfg.model.task != "causal_lm":
        raise ConfigError(
            f"infer: {run_dir} fine-tuned a {cfg.model.task} model; infer generates text (causal_lm)"
        )
    cut = UCut(opts.n_in, opts.n_out)
    cut.check(loaded.anatomy.num_layers)
    device, cloud = get_profile(opts.device_profile), get_profile(opts.cloud_profile)
    drafter = _drafter(run_dir, cfg, loaded, tokenizer, cut, opts) if opts.gamma > 0 else None
    text, special = opts.prompt, True
    if tokenizer.chat is not None and not opts.raw_prompt:
        text, special = tokenizer.chat.render(tokenizer.renderer, opts.prompt), False
    prompt = tokenizer.encode([text], 1_000_000, special)[0]
    if tokenizer.kind == "bpe" and prompt and prompt[-1] == tokenizer.eos_id:
        prompt = prompt[:-1]  # cotune's BPE ends every text with <eos>; a prompt continues
    if not prompt:
        raise ConfigError("--prompt: the prompt encodes to no tokens")
    gen = UGenerator(loaded.anatomy, cut, drafter=drafter, gamma=opts.gamma, codec=opts.codec)
    chunk, ttfts = opts.prefill_chunk, None
    if chunk == "auto":
        chunk, ttfts = choose_prefill_chunk(gen, prompt, device, cloud)
    gen.prefill_chunk = chunk  # type: ignore[assignment]
    tl = Timeline(device, cloud, parallel_drafting=opts.parallel_drafting)
    out = gen.generate(prompt, opts.max_new_tokens, Sampling(opts.temperature), seed=opts.seed,
                       eos_token_id=tokenizer.eos_id, timeline=tl)  # fmt: skip
    pieces = [tokenizer.decode([t]) for t in out.tokens]
    return {
        "run_dir": str(run_dir),
        "prompt": opts.prompt,
        "model_input": text,  # the prompt as the model read it (its conversation, if any)
        "text": tokenizer.decode(out.tokens),
        "tokens": out.tokens,
        # Why it stopped: the model ended the text, or --max-new-tokens.
        "finish_reason": "eos" if out.tokens and out.tokens[-1] == tokenizer.eos_id else "length",
        "pieces": pieces,
        "options": asdict(opts),
        "prefill_chunk": chunk,
        "prefill_chunk_ttft_s": [{"chunk": k, "ttft_s": v} for k, v in (ttfts or {}).items()],
        "host": {"ttft_s": out.ttft_s, "tbt_s": out.tbt_s, "token_times_s": out.token_times},
        "simulated": {**tl.summary(), "token_times_s": tl.token_times},
        "acceptance_rate": out.acceptance_rate,
        "drafted": out.drafted,
        "accepted": out.accepted,
        "cloud_rounds": out.decode_rounds,
        "bytes_per_token": out.bytes_per_token,
        "messages": out.link.messages,
    }


def format_result(res: dict[str, Any]) -> str:
    """The generated text, a per-token timing table and one summary line."""
    from cotune.report.units import fmt_bytes, fmt_seconds

    host, sim = res["host"]["token_times_s"], res["simulated"]["token_times_s"]
    lines = [
        res.get("model_input", res["prompt"]) + res["text"],
        "",
        f"{'#':>3}  {'token':<16} {'host':>10} {'simulated':>10}",
    ]
    for i, (piece, h, s) in enumerate(zip(res["pieces"], host, sim)):
        lines.append(f"{i:>3}  {piece!r:<16} {fmt_seconds(h):>10} {fmt_seconds(s):>10}")
    s, o = res["simulated"], res["options"]
    acc = res["acceptance_rate"]
    lines.append("")
    lines.append(
        f"{o['device_profile']} ↔ {o['cloud_profile']}, cut {o['n_in']}+{o['n_out']}, "
        f"γ={o['gamma']}, prefill chunk {res['prefill_chunk']}: simulated TTFT "
        f"{fmt_seconds(s['ttft_s'])}, TBT {fmt_seconds(s['tbt_s'] or 0)}; host TTFT "
        f"{fmt_seconds(res['host']['ttft_s'])}; acceptance "
        f"{'—' if acc is None else f'{acc:.2f}'}; {fmt_bytes(res['bytes_per_token'])}/token"
    )
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
