"""A run's experiment built from its config: data, tokenizer, model and adapters, the partition,
the engine and grid, the paradigm's preflight; and the checks that come before any of it
(every node's device and precision, the PEFT method's options). Touches no files: a config or
data error leaves no run directory behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.config import RunConfig
from cotune.errors import CotuneError


@dataclass
class NodeInputs:
    """A deployed device's own inputs, in place of the config's dataset and partition: its
    training data (labelled with the run's ids) and the run's tokenizer when the server trained
    one (``random:`` models), so the device never needs the server's data."""

    data: Any  # TaskData
    tokenizer: Any  # Tokenizer, or None: the model's own
    index: int  # which device this is


def chat_format(cfg: RunConfig, tokenizer: Any, train: list[Any]) -> Any:
    """``data.chat_template`` resolved against the run's tokenizer; prompts it applies to."""
    from cotune.data.chat import resolve_chat
    from cotune.errors import DataError

    chat = resolve_chat(
        cfg.data.chat_template, cfg.data.system_prompt, tokenizer, cfg.model.name_or_path
    )
    if chat is not None and not any(e.prompt is not None for e in train):
        raise DataError(
            "data.chat_template: the training data has no prompts to make conversations of; "
            "set data.prompt_field, or use an instruct view (e.g. fortunes with view: instruct)"
        )
    return chat


def build_experiment(
    cfg: RunConfig,
    run_dir: Path,
    *,
    quiet: bool,
    inputs: NodeInputs | None = None,
    base_digest: bool = False,
):
    """Load data, tokenizer, model and adapters; partition; wire the engine. Touches no files.
    With ``inputs`` (a device of a deployed run with its own data file), device ``inputs.index``
    holds all of ``inputs.data`` and no other device holds anything. With ``base_digest``, or
    on a deployed run's server (engine grpc or ray), ``exp.base_digest`` fingerprints the
    loaded base and its tokenizer (``models.digest``) for the devices to check theirs against."""
    import torch

    from cotune.accel.placement import place_model
    from cotune.data import build_tokenizer, encode_dataset, load_task_data, partition
    from cotune.models import load_model
    from cotune.nodes import make_grid
    from cotune.paradigms import get_preflight
    from cotune.paradigms.base import Experiment
    from cotune.peft import inject_adapters
    from cotune.runtime import LocalEngine
    from cotune.sim.simulation import Simulation
    from cotune.train import Trainer

    torch.manual_seed(cfg.seed)
    sim = Simulation.from_config(cfg.devices, cfg.seed)  # fleet errors first: they are cheap
    device = check_devices(cfg)  # the server's; every node's is resolved (and checked) here
    task = cfg.model.task
    data = load_task_data(cfg.data, task, cfg.seed) if inputs is None else inputs.data
    num_labels = len(data.label_names) if task == "classification" and data.label_names else None
    random_model = cfg.model.name_or_path.startswith("random:")
    tokenizer = inputs.tokenizer if inputs is not None else None
    if random_model and tokenizer is None:
        tokenizer = build_tokenizer(None, [e.text for e in data.train], cfg.data.bpe_vocab_size)
    loaded = load_model(
        cfg.model,
        num_labels=num_labels,
        vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
        seed=cfg.seed,
    )
    digest = None
    if base_digest or cfg.engine.kind in ("grpc", "ray"):  # before adapters, placement
        from cotune.models.digest import weights_digest

        digest = weights_digest(loaded.model)
    place_model(loaded, cfg, device)  # quantized, on the server's device, computing as asked
    if tokenizer is None:
        tokenizer = build_tokenizer(loaded.tokenizer, [], cfg.data.bpe_vocab_size)
    if digest is not None:  # a device's text must become the ids the server's model reads
        from cotune.models.digest import VOCABULARY, vocabulary_digest

        digest[VOCABULARY] = vocabulary_digest(tokenizer)
    tokenizer.chat = chat_format(cfg, tokenizer, data.train)
    train_set = encode_dataset(data.train, tokenizer, cfg.model.max_length, task).on(device)
    test_examples = data.test
    if cfg.eval.mixture is not None:  # the target domain mix the run is evaluated on
        from cotune.data.mixture import mix_examples

        test_examples = mix_examples(test_examples, cfg.eval.mixture, data.group_names, cfg.seed)
    if cfg.eval.max_examples:
        test_examples = test_examples[: cfg.eval.max_examples]
    # A device with its own data has no test set (the server evaluates): one example stands in.
    test_examples = test_examples or data.train[:1]
    test_set = encode_dataset(test_examples, tokenizer, cfg.model.max_length, task).on(device)
    labels = [e.group for e in data.train]  # class ids, or a causal LM's domains (or None)
    if inputs is None:
        parts = partition(labels, cfg.devices.count, cfg.partition, cfg.seed)
    else:
        parts = [[] for _ in range(cfg.devices.count)]
        parts[inputs.index] = list(range(len(data.train)))
    if cfg.data.mixture is not None:  # every shard resampled to the domain mixture
        from cotune.data.mixture import mix_parts

        parts = mix_parts(parts, labels, cfg.data.mixture, data.group_names, cfg.seed)
    heads = loaded.anatomy.head_paths()
    peft_cfg = cfg.peft
    if peft_cfg.method in ("gelora", "ggm") and inputs is not None:
        from cotune.errors import ConfigError

        raise ConfigError(
            f"peft.method: {peft_cfg.method} chooses its ranks from the run's training data at "
            "setup; a device with its own --data file cannot reproduce them (use the config's data)"
        )
    if peft_cfg.method == "gelora":  # per-layer ranks from the data, before injection
        from cotune.peft.gelora import gelora_peft_section

        peft_cfg = gelora_peft_section(
            peft_cfg, loaded.model, loaded.anatomy, train_set, parts, seed=cfg.seed,
            head_paths=heads, batch_size=cfg.eval.batch_size, sim=sim,
        )  # fmt: skip
    if cfg.peft.stages is not None and inputs is None:  # names, paradigm, domains: up front
        from cotune.stages import check_stages

        check_stages(cfg, labels, parts, data.group_names)
    ggm = None
    if peft_cfg.method == "ggm":  # a warm-up and a graph choose the components to train
        from cotune.peft.ggm_setup import ggm_adapters

        peft_cfg, adapters, ggm = ggm_adapters(
            cfg, peft_cfg, loaded, train_set, parts, head_paths=heads, sim=sim
        )
    else:
        adapters = inject_adapters(loaded.model, peft_cfg, anatomy=loaded.anatomy, head_paths=heads)
    if peft_cfg.method == "d2lora" or cfg.peft.warmup is not None:  # every role starts warmed
        from cotune.peft.d2lora import d2lora_stage

        d2lora_stage(cfg, loaded, tokenizer, adapters, sim)
    trainer = Trainer(adapters.named_trainable(), cfg.train, cfg.train.steps)
    engine = LocalEngine(codec=cfg.engine.codec, wire=cfg.engine.kind != "local")
    engine.add_listener(sim.clock.on_transfer)  # every encoded message costs link time
    exp = Experiment(
        cfg=cfg,
        loaded=loaded,
        adapters=adapters,
        data=data,
        train_set=train_set,
        test_set=test_set,
        parts=parts,
        engine=engine,
        trainer=trainer,
        run_dir=run_dir,
        sim=sim,
        quiet=quiet,
        tokenizer=tokenizer,
        peft_section=peft_cfg,
        ggm_allocation=ggm.to_json() if ggm is not None else None,
        base_digest=digest,
    )
    exp.grid = make_grid(exp)
    preflight = get_preflight(cfg.paradigm.name)
    if preflight is not None:  # cuts, depths, memory: the checks that need the model
        try:
            preflight(exp)
        except BaseException:
            exp.grid.close()
            raise
    return exp, tokenizer


def check_devices(cfg: RunConfig) -> Any:
    """Every node's ``train.device`` / ``train.node_devices`` resolved on this machine, and what
    runs there checked (quantization, autocast, paradigm support); returns the server's device."""
    from cotune.accel.placement import check_placement, node_device
    from cotune.accel.precision import check_precision
    from cotune.nodes import infrastructure
    from cotune.runtime.ids import SERVER, device_id

    nodes = [SERVER, *(device_id(i) for i in range(cfg.devices.count)), *infrastructure(cfg)]
    server = check_placement(cfg, nodes)
    placed = {node_device(cfg.train, n) for n in nodes} if cfg.engine.kind == "isolated" else set()
    for device in {server, *placed}:
        check_precision(cfg, device)
    return server


def check_methods(cfg: RunConfig) -> None:
    """PEFT method names and options: before any data or model is loaded (seconds, not minutes)."""
    from cotune.peft import get_method

    try:
        get_method(cfg.peft.method).parse_options(cfg.peft.options)
    except CotuneError as err:
        text = str(err)
        raise type(err)(text if text.startswith("peft.") else f"peft.method: {text}") from None
