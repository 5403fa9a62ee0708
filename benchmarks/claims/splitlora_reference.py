"""SplitLoRA's reference code beside cotune's `splitfed`: host time per round and peak memory.

The same random GPT-2 (6 blocks, width 384, 6 heads, GPT-2's 50,257-token vocabulary, no
dropout), the same 128-token sequences (Jane Austen text from cotune's built-in `austen`,
tokenized once by the model's tokenizer), 3 clients, batch 4 each, cut after block 3, LoRA rank
4 / alpha 32 on q and v inside GPT-2's fused `c_attn` on both sides, AdamW (lr 2e-4, betas 0.9 /
0.98, weight decay 0.01, bias-corrected), linear decay, no clipping, client adapters averaged
every 100 client batches. A round is one batch of every client. Each side runs in its own
process, one after the other, `--repeats` times, alternating (the machine is noisy: read the
ratios, not the absolute figures).

- **The reference** (`FDU-INC/Split_LoRA`, `SplitLoRA/examples/src/gpt2_ft_sfl.py`) is not part
  of cotune and is never copied into it: its source is read from the path you give and run
  as it is, with the smallest changes that let it run on a CPU, made in memory: every
  `torch.device("cuda")` becomes `torch.device("cpu")`, every `.cuda()` is dropped, and `gpu.py`'s
  `parse_gpu` (which needs NCCL) is replaced by a one-process gloo group, so the script's own
  `DistributedSampler`s and barriers work; `--platform cpu` takes its `distributed_opt` branch
  that does not wrap the models in DistributedDataParallel (one process has nothing to
  all-reduce). Its `--log_interval 3` log line gives ms per client batch over each round. The
  model sizes come from replacing its `GPT2Config`'s sizes (its model cards are GPT-2 S/M/L).
- **cotune**: `splitfed` with `aggregate_unit: client_batches` (the reference's unit) and
  `peft.options.enable_lora: [true, false, true]` (the reference's q/v-only LoRA in `c_attn`),
  the in-process engine with its default device cohort, and the simulator running underneath
  (its clock and cost accounting are part of cotune's step); host time per round from the run's
  `metrics.jsonl`.
- **Memory**: each process's peak resident set (`ru_maxrss`), and the same less the resident set
  just before the run starts (after the libraries are imported): "training memory", which
  leaves out cotune's extra imports (transformers, pydantic, ...) and counts the models,
  optimizer state, data and activations.

The first --warmup rounds are left out of the per-round median. Losses are the mean over the
last 5 rounds (the two sides draw their batches with different samplers and initialise LoRA A
with different RNG streams: comparable, not equal).

Run: .venv/bin/python benchmarks/claims/splitlora_reference.py --reference PATH
         [--rounds 40 --repeats 2 --threads 2 --out FILE.json]
PATH: a checkout of https://github.com/FDU-INC/Split_LoRA (or its SplitLoRA/ folder); also read
from $COTUNE_SPLITLORA_REF. Without it the script prints why and exits 0 (skipped). The
reference needs pandas and openpyxl (it imports pandas and writes an .xlsx log at its last step):
`.venv/bin/pip install pandas openpyxl`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path("examples") / "src" / "gpt2_ft_sfl.py"
SIZES = {"n_layer": 6, "n_embd": 384, "n_head": 6}
SEQ_LEN, BATCH, CLIENTS, CUT, RANK, ALPHA, LR = 128, 4, 3, 3, 4, 32, 2e-4
AGGREGATE_EVERY = 100  # client batches, the reference's hard-coded period

# The in-memory edits that let the reference run on a CPU: (what, replacement, why).
CPU_EDITS = [
    ('torch.device("cuda")', 'torch.device("cpu")', "its tensors and models go to the CPU"),
    (".cuda()", "", "its models stay on the CPU"),
]


class Skip(Exception):
    """The reference cannot be run here; the message says why and what to do."""


def reference_root(given: str | None) -> Path:
    """The folder holding `examples/src/gpt2_ft_sfl.py` and `loralib/` (SplitLoRA/)."""
    where = given or os.environ.get("COTUNE_SPLITLORA_REF")
    if not where:
        raise Skip(
            "no reference source given: pass --reference PATH (a checkout of "
            "https://github.com/FDU-INC/Split_LoRA) or set COTUNE_SPLITLORA_REF"
        )
    base = Path(where).expanduser()
    for root in (base / "SplitLoRA", base):
        if (root / SCRIPT).is_file() and (root / "loralib" / "__init__.py").is_file():
            return root.resolve()
    raise Skip(
        f"{base}: no SplitLoRA/{SCRIPT.as_posix()} (with SplitLoRA/loralib/) under it; "
        "give the path of a Split_LoRA checkout"
    )


def check_reference_needs() -> None:
    missing = [m for m in ("pandas", "openpyxl") if _missing(m)]
    if missing:
        raise Skip(
            f"the reference's script needs {' and '.join(missing)} (it imports pandas and writes "
            f"an .xlsx log): .venv/bin/pip install {' '.join(missing)}"
        )


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def cpu_source(text: str, where: str) -> str:
    """The reference script with CPU_EDITS applied; each must match, or the script has changed
    in a way this harness does not know (then say so instead of running something else)."""
    for old, new, _why in CPU_EDITS:
        if old not in text:
            raise Skip(f"{where}: expected {old!r} in the reference script (has it changed?)")
        text = text.replace(old, new)
    return text


_REF_LOG = re.compile(
    r"ms/batch\s+([0-9.]+)\s*\|\s*loss\s+([0-9.naif]+)\s*\|\s*avg loss\s+([0-9.naif]+)"
)


def parse_reference_log(stdout: str) -> tuple[list[float], list[float]]:
    """(seconds per round, mean loss per round) from the reference's log lines, logged every
    3 client batches (= one round): ms/batch x 3 clients."""
    secs, losses = [], []
    for m in _REF_LOG.finditer(stdout):
        secs.append(float(m.group(1)) * CLIENTS / 1000.0)
        losses.append(float(m.group(3)))
    return secs, losses


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _memory() -> dict[str, float]:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------- shared inputs (model, tokens)


def prepare(work: Path, ref: Path, seed: int) -> dict[str, Any]:
    """The random GPT-2 in HF format (cotune) and as a state dict (the reference), GPT-2's
    tokenizer from the reference's vocab/tokenizer.json, the token windows for both sides."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    vocab = ref / "examples" / "vocab"
    end = "<|endoftext|>"
    tok = GPT2TokenizerFast(
        tokenizer_file=str(vocab / "tokenizer.json"), eos_token=end, bos_token=end, unk_token=end
    )
    config = GPT2Config(
        vocab_size=50257, n_positions=1024, **SIZES, n_inner=4 * SIZES["n_embd"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    # The reference's loader takes GPT-2's original key names (no "transformer." prefix).
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied to wte on both sides
    torch.save(sd, work / "init.pt")

    # 128-token windows of each novel's running text, decoded and re-encoded the way cotune
    # will encode them, so both sides see exactly the same ids.
    novels: dict[str, list[str]] = {}
    with gzip.open(ROOT / "src/cotune/data/builtin/austen.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "text" in row:
                novels.setdefault(row["novel"], []).append(row["text"])
    texts, ids = [], []
    for passages in novels.values():
        stream = tok(" ".join(passages))["input_ids"]
        for at in range(0, len(stream) - SEQ_LEN, SEQ_LEN):
            text = tok.decode(stream[at : at + SEQ_LEN])
            again = tok(text, truncation=True, max_length=SEQ_LEN)["input_ids"]
            if len(again) == SEQ_LEN:
                texts.append(text)
                ids.append(again)
    return {"model_dir": model_dir, "texts": texts, "ids": ids}


def write_inputs(work: Path, prep: dict[str, Any], n_per_client: int) -> dict[str, Any]:
    n = n_per_client * CLIENTS
    if len(prep["ids"]) < n + 8:
        raise SystemExit(f"only {len(prep['ids'])} windows of {SEQ_LEN} tokens; lower --rounds")
    data = work / "texts.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for text in prep["texts"][: n + 8]:  # 8 held out: cotune's test split needs some
            f.write(json.dumps({"text": text}) + "\n")
    files = []
    for c in range(CLIENTS):
        path = work / f"train{c}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for seq in prep["ids"][c * n_per_client : (c + 1) * n_per_client]:
                # context = the first token, completion = the rest: the reference's "clm"
                # objective then scores every next token, as cotune's causal-LM loss does.
                f.write(json.dumps({"context": seq[:1], "completion": seq[1:]}) + "\n")
        files.append(path)
    return {"data": data, "train_files": files, "test_fraction": 8 / (n + 8)}


# ---------------------------------------------------------------- the two sides (subprocesses)


def reference_child(ref: Path, work: Path, rounds: int, threads: int, seed: int) -> None:
    """Run the reference's script in this process, on the CPU; print one JSON line at the end."""
    import torch

    torch.set_num_threads(threads)
    sys.path[:0] = [str(ref / "examples" / "src"), str(ref)]
    import pandas  # noqa: F401  (its import; counted in the baseline)
    import splitmodel  # the reference's
    import torch.distributed as dist

    import gpu  # the reference's

    def parse_cpu(args: Any) -> None:
        torch.manual_seed(args.random_seed)  # as its parse_gpu does first
        dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
        args.rank, args.local_rank, args.world_size = 0, 0, 1
        args.device, args.dist = torch.device("cpu"), dist

    gpu.parse_gpu = parse_cpu
    sized = splitmodel.GPT2Config

    class Config(sized):  # its model cards are GPT-2 S/M/L; this run's sizes instead
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **{**k, **SIZES})

    splitmodel.GPT2Config = Config
    script = ref / SCRIPT
    code = compile(cpu_source(script.read_text(encoding="utf-8"), str(script)), str(script), "exec")
    files = [work / f"train{c}.jsonl" for c in range(CLIENTS)]
    sys.argv = [str(script), "--platform", "cpu", "--random_seed", str(seed),
                *[x for c, f in enumerate(files) for x in (f"--train_data{c}", str(f))],
                "--valid_data", str(files[0]), "--train_batch_size", str(BATCH),
                "--seq_len", str(SEQ_LEN), "--model_card", "gpt2.sm",
                "--init_checkpoint", str(work / "init.pt"), "--lora_dim", str(RANK),
                "--lora_alpha", str(ALPHA), "--lr", str(LR), "--weight_decay", "0.01",
                "--correct_bias", "--scheduler", "linear", "--max_step", str(rounds * CLIENTS),
                "--log_interval", str(CLIENTS), "--eval_interval", str(10**9),
                "--save_interval", str(10**9), "--work_dir", str(work / "ref_out")]  # fmt: skip
    (work / "trained_models" / "GPT2_S" / "e2e").mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # it writes its .xlsx log and final checkpoint relative to the cwd
    baseline = _rss_kb() / 1024
    exec(code, {"__name__": "__main__", "__file__": str(script)})
    print("RESULT " + json.dumps({**_memory(), "baseline_rss_mb": baseline}), flush=True)


def cotune_child(work: Path, rounds: int, threads: int, seed: int, cohort: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    from cotune.config import config_from_dict
    from cotune.run import run_experiment

    inputs = json.loads((work / "inputs.json").read_text())
    d = {
        "name": "splitlora-ref-side",
        "seed": seed,
        "model": {"name_or_path": str(work / "model"), "task": "causal_lm",
                  "max_length": SEQ_LEN},
        "data": {"dataset": inputs["data"], "test_fraction": inputs["test_fraction"]},
        "partition": {"scheme": "iid"},
        "devices": {"count": CLIENTS, "server": "a100"},
        "peft": {"method": "lora", "r": RANK, "alpha": ALPHA, "dropout": 0.0,
                 "target_modules": ["c_attn"],
                 "options": {"enable_lora": [True, False, True]}},
        "paradigm": {"name": "splitfed", "options": {
            "cut": CUT, "aggregate_every": AGGREGATE_EVERY, "aggregate_unit": "client_batches",
            "server_side": "shared", "server_batch": "sequential", "cohort": cohort}},
        "train": {"steps": rounds, "batch_size": BATCH, "lr": LR, "weight_decay": 0.01,
                  "betas": [0.9, 0.98], "schedule": "linear", "warmup_steps": 0,
                  "max_grad_norm": None, "device": "cpu"},
        "eval": {"every": 10**6, "max_examples": 8},
        "output": {"dir": str(work / "cotune_out"), "save_adapter": False,
                   "checkpoint_every": 0},
    }  # fmt: skip
    cfg = config_from_dict(d)
    baseline = _rss_kb() / 1024
    run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r["step"], r["host_time_s"], r["loss"]) for r in recs if r["event"] == "train")
    secs = [b[1] - a[1] for a, b in zip(train, train[1:])]
    losses = [t[2] for t in train[1:]]
    print("RESULT " + json.dumps({**_memory(), "baseline_rss_mb": baseline, "round_s": secs,
                                  "loss": losses}), flush=True)  # fmt: skip


def _child(argv: list[str], log: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"{argv[0]} side failed (rc {proc.returncode}); log {log}:\n{tail}")
    out = json.loads(line.removeprefix("RESULT "))
    if argv[0] == "_reference":
        out["round_s"], out["loss"] = parse_reference_log(proc.stdout)
    return out


def summarize(runs: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    per_round = [s for r in runs for s in r["round_s"][warmup:]]
    last = [statistics.fmean(r["loss"][-5:]) for r in runs]
    return {
        "round_ms": 1000 * statistics.median(per_round),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "training_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs),
        "final_loss": statistics.fmean(last),
        "first_loss": statistics.fmean(r["loss"][0] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", help="a Split_LoRA checkout (default: $COTUNE_SPLITLORA_REF)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="first rounds left out of the median")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    try:
        ref = reference_root(args.reference)
        check_reference_needs()
        cpu_source((ref / SCRIPT).read_text(encoding="utf-8"), str(ref / SCRIPT))
    except Skip as why:
        print(f"skipped: {why}")
        return

    with tempfile.TemporaryDirectory(prefix="splitlora_ref_") as tmp:
        work = Path(tmp)
        prep = prepare(work, ref, args.seed)
        inputs = write_inputs(work, prep, n_per_client=args.rounds * BATCH)
        (work / "inputs.json").write_text(json.dumps({
            "data": str(inputs["data"]), "test_fraction": inputs["test_fraction"]}))  # fmt: skip
        common = [str(work), str(args.rounds), str(args.threads), str(args.seed)]
        sides: dict[str, list[dict[str, Any]]] = {"reference": [], "cotune": [], "cotune_seq": []}
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}: reference", flush=True)
            sides["reference"].append(
                _child(["_reference", str(ref), *common], work / f"ref{rep}.log")
            )
            print(f"repeat {rep + 1}/{args.repeats}: cotune (cohort on, then off)", flush=True)
            sides["cotune"].append(_child(["_cotune", *common, "1"], work / f"cot{rep}.log"))
            sides["cotune_seq"].append(_child(["_cotune", *common, "0"], work / f"seq{rep}.log"))

    s = {k: summarize(v, args.warmup) for k, v in sides.items()}
    r = s["reference"]
    print(f"\n{'':<28}{'host ms/round':>14}{'peak RSS MB':>13}{'training MB':>13}"
          f"{'loss first→last 5':>22}")  # fmt: skip
    names = {"reference": "SplitLoRA reference (CPU)", "cotune": "cotune splitfed",
             "cotune_seq": "cotune, cohort off"}  # fmt: skip
    for k, v in s.items():
        print(f"{names[k]:<28}{v['round_ms']:>14.1f}{v['peak_rss_mb']:>13.0f}"
              f"{v['training_mb']:>13.0f}{v['first_loss']:>13.3f} → {v['final_loss']:.3f}")  # fmt: skip
    ratios = {}
    for k in ("cotune", "cotune_seq"):
        ratios[k] = {m: s[k][m] / r[m] for m in ("round_ms", "peak_rss_mb", "training_mb")}
        print(f"{names[k]} / reference: host time per round {ratios[k]['round_ms']:.3f}×, "
              f"peak memory {ratios[k]['peak_rss_mb']:.3f}×, "
              f"training memory {ratios[k]['training_mb']:.3f}×")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "sides": s, "ratios": ratios,
                                              "runs": sides}, indent=2) + "\n")  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":
        _, _, ref_, work_, rounds_, threads_, seed_ = sys.argv
        reference_child(Path(ref_), Path(work_), int(rounds_), int(threads_), int(seed_))
    elif len(sys.argv) > 1 and sys.argv[1] == "_cotune":
        _, _, work_, rounds_, threads_, seed_, cohort_ = sys.argv
        cotune_child(Path(work_), int(rounds_), int(threads_), int(seed_), cohort_ == "1")
    else:
        main()
