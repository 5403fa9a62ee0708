"""Claims (PEFT papers): each method improves on LoRA at (about) equal trainable parameters.

KaSA (arXiv 2412.06071), BoRA (2412.06441), DoRA (2402.09353), PiSSA (2404.02948), GeLoRA
(2412.09250), MoSLD (2412.08946), GGM (2412.08592): each paper reports gains over LoRA on its
benchmarks. Setting: the demo task (MiniLM, 5 `fortunes` categories, central), r 8 / α 16 on
query/value for every method and its default options (GeLoRA at LoRA's parameter budget; MoSLD
joint stage; GGM: 16 candidates, keeps 96 of 192 components = LoRA r 8's count, its 20 warm-up
steps counted in --steps), --steps steps at lr --lr, accuracy on 200 test examples. Paired
difference to LoRA per seed. (MoDULA is a multi-task method with three stages; not run here.)

Run: .venv/bin/python benchmarks/claims/peft_methods.py [--seeds 0 1 2 --steps 100 --lr 2e-3]
"""

from __future__ import annotations

import argparse

from harness import figure, read_yaml, run_config, run_seeds, save, verdict

METHODS = {
    "dora": {}, "bora": {}, "kasa": {}, "pissa": {}, "gelora": {}, "mosld": {},
    "ggm": {"r": 16, "options": {"warmup_steps": 20, "important_nodes": 48, "kept_nodes": 96}},
}  # fmt: skip
PAPERS = {
    "dora": "DoRA (arXiv 2402.09353): above LoRA on commonsense reasoning, e.g. +3.7 on LLaMA-7B",
    "bora": "BoRA (arXiv 2412.06441): above LoRA and DoRA on GLUE/NLG at equal parameters",
    "kasa": "KaSA (arXiv 2412.06071): above LoRA/PiSSA/MiLoRA on GLUE, NLG and instruction tasks",
    "pissa": "PiSSA (arXiv 2404.02948): faster convergence and higher accuracy than LoRA",
    "gelora": "GeLoRA (arXiv 2412.09250): above LoRA at equal parameter budget on GLUE",
    "mosld": "MoSLD (arXiv 2412.08946): above LoRA in multi-task settings with fewer parameters",
    "ggm": "APCA-GGM (arXiv 2412.08592): competitive GLUE accuracy with fewer trainable parameters",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()

    def arm(method: str, seed: int) -> tuple[float, int]:
        d = read_yaml("configs/demo/central.yaml")
        d.update(name=f"method-claim-{method}-{seed}", seed=seed)
        extra = dict(METHODS.get(method, {}))
        d["peft"].update(method=method, **extra)
        steps = args.steps - extra.get("options", {}).get("warmup_steps", 0)
        d["train"].update(steps=steps, lr=args.lr, warmup_steps=max(1, steps // 10))
        d["eval"].update(every=steps, max_examples=200)
        s = run_config(d)
        return s["final"]["accuracy"], s["trainable_params"]

    params: dict[str, int] = {}

    def one(seed: int) -> dict[str, float]:
        row = {}
        row["lora"], params["lora"] = arm("lora", seed)
        for m in args.methods:
            acc, params[m] = arm(m, seed)
            row[m] = acc
            row[f"{m}-lora"] = acc - row["lora"]
        return row

    runs = run_seeds(one, args.seeds)
    per = {}
    for m in args.methods:
        per[m] = {
            "paper": PAPERS[m],
            "trainable_params": params[m],
            "lora_params": params["lora"],
            "figures": [figure(f"{m} accuracy", runs[m]),
                        figure(f"{m} − LoRA (points)", [100 * v for v in runs[f"{m}-lora"]], "points")],
            "verdict": verdict(runs[f"{m}-lora"], expect="positive"),
        }  # fmt: skip
    save("peft_methods", {
        "title": "PEFT methods vs LoRA at equal trainable parameters",
        "paper": "each method's paper reports gains over LoRA (see per method)",
        "setting": f"MiniLM classification, 5 fortunes categories, central, r 8 / α 16 on "
                   f"query/value, {args.steps} steps (batch 16, lr {args.lr:g}), 200 test examples",
        "reconstruction": "one small encoder task instead of each paper's benchmarks; default "
                          "options (see docs/methods.md for each method's reconstructions)",
        "figures": [figure("LoRA accuracy", runs["lora"])],
        "methods": per,
        "verdict": ", ".join(f"{m}: {x['verdict']}" for m, x in per.items()),
        "expect": "method − LoRA > 0",
    })  # fmt: skip


if __name__ == "__main__":
    main()
