"""hat_serve: devices generate U-shaped through a cloud role over the Grid (issue 16)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cotune.errors import ConfigError
from cotune.export import load_run_model
from cotune.infer.drafter import save_drafter
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut
from cotune.run import run_experiment
from cotune.runtime import Message
from tests.paradigms.test_hat_drafter import LM, drafter_config

SERVE = {"gamma": 3, "max_new_tokens": 8, "prompt_tokens": 6}


def serve_config(tiny_config, name="serve", options=None, **over):
    sections = {**LM, "name": name, "train": {"steps": 2},
                "paradigm": {"name": "hat_serve", "options": {**SERVE, **(options or {})}}}  # fmt: skip
    for k, v in over.items():
        sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_config(**sections)


def served(run_dir):
    return json.loads((run_dir / "serving.json").read_text())


def random_drafter(tmp_path, hidden=64, cut=None):
    """A drafter whose guesses differ from the middle's (so drafts get rejected)."""
    torch.manual_seed(3)
    adapter = MiddleAdapter(hidden)
    torch.nn.init.normal_(adapter.down.weight, std=0.05)
    return save_drafter(adapter, cut or UCut(1, 1), tmp_path / "drafter", {"made": "test"})


def unsplit_greedy(run_dir, prompt, n, eos):
    """The full model's own greedy continuation (transformers' generate, no cut)."""
    _, loaded, _, _ = load_run_model(run_dir, run_dir / "adapter")
    out = loaded.model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
        pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "options",
    [
        {},  # the untrained drafter: it skips the middle
        {"gamma": 0, "prefill_chunk": 2},  # plain U-shaped, the prompt in chunks
        "random-drafter",  # drafts rejected: both sides roll their caches back
    ],
)
def test_greedy_serving_over_the_grid_equals_the_unsplit_model(tiny_config, tmp_path, options):
    if options == "random-drafter":
        options = {"drafter": str(random_drafter(tmp_path)), "gamma": 4}
    run_dir = run_experiment(serve_config(tiny_config, options=options), quiet=True, report=False)
    s = served(run_dir)
    assert len(s["requests"]) == 2 * 2  # 2 devices x train.steps requests
    eos = 1  # cotune's BPE: <pad>=0, <eos>=1
    for r in s["requests"]:
        assert r["ok"] and len(r["prompt"]) == 6
        assert r["tokens"] == unsplit_greedy(run_dir, r["prompt"], 8, eos)[: len(r["tokens"])]
        assert len(r["host_token_times_s"]) == len(r["tokens"])
    if options.get("gamma") == 4:
        assert 0 < s["acceptance_rate"] < 1  # rejections happened, and the output still matched
    if options.get("gamma") == 0:
        assert s["cloud_rounds_per_token"] > 1  # 3 chunks + one round per later token


def test_costs_bytes_and_outputs_are_counted_and_written(tiny_config):
    run_dir = run_experiment(serve_config(tiny_config), quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    s = served(run_dir)
    roles = summary["costs"]["roles"]
    # both ends computed: the device its ends and drafts, the cloud its middle
    assert roles["device-0"]["flops"] > 0 and roles["server"]["flops"] > 0
    # the bytes each device measured are its real middle messages: within what the engine
    # counted for it, the rest being the small generate/loaded replies and the drafter download
    for dev in ("device-0", "device-1"):
        mine = [r for r in s["requests"] if r["device"] == dev]
        up = sum(r["bytes_up"] for r in mine)
        assert 0 < up < roles[dev]["bytes_up"] < up + 4000
        down = sum(r["bytes_down"] for r in mine)
        weights = 4 * (64 * 64 * 2 + 64 * 4)  # the drafter: fp32 up/down/norm, once
        assert down + weights < roles[dev]["bytes_down"] < down + weights + 8000
    final = summary["final"]
    assert final["requests"] == 4 and final["failed_requests"] == 0
    assert final["bytes_per_token"] == s["bytes_per_token"]
    with (run_dir / "serving.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["device"] == "device-0" and float(rows[0]["host_ttft_s"]) > 0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if r["event"] == "generate"]) == 4


def test_a_bad_upload_is_refused_and_the_run_goes_on(tiny_config, monkeypatch):
    """device-1 uploads NaNs: the cloud answers middle_error, device-1's requests fail with
    the reason, device-0 is served as usual."""
    from cotune.infer import split

    real = split.GridLink.request

    def corrupt(self, msg):
        if msg.sender == "device-1":
            msg = Message(msg.kind, msg.sender, msg.receiver,
                          {"hidden": torch.full_like(msg.tensors["hidden"], float("nan"))},
                          msg.meta)  # fmt: skip
        return real(self, msg)

    monkeypatch.setattr(split.GridLink, "request", corrupt)
    run_dir = run_experiment(serve_config(tiny_config), quiet=True, report=False)
    s = served(run_dir)
    bad = [r for r in s["requests"] if r["device"] == "device-1"]
    good = [r for r in s["requests"] if r["device"] == "device-0"]
    assert all(not r["ok"] and "NaN" in r["error"] for r in bad)
    assert all(r["ok"] and r["tokens"] for r in good)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["failed_requests"] == 2 and summary["extra"]["refused_uploads"] == 2


def test_the_cloud_refuses_malformed_uploads_with_the_reason(tiny_config, tmp_path):
    from cotune.build import build_experiment
    from cotune.paradigms.hat_serve import ServingCloud

    exp, _ = build_experiment(serve_config(tiny_config), tmp_path / "unused", quiet=True)
    cloud = ServingCloud(exp.grid.context("server"), UCut(1, 1))
    h = torch.zeros(1, 3, 64)
    ok = cloud.handle(Message("middle", "device-0", "server", {"hidden": h}, {"pos": 0}))
    assert ok.kind == "middle_out" and ok.tensors["hidden"].shape == (1, 3, 64)
    for tensors, meta, why in [
        ({"hidden": torch.zeros(1, 2, 32)}, {"pos": 3}, "expected shape"),
        ({"hidden": h}, {"pos": 9}, "beyond the 3 cached positions"),
        ({"hidden": h}, {"pos": "0"}, "meta.pos"),
        ({"hidden": h}, {"pos": 2}, "beyond the 0 cached positions of device-1"),
    ]:
        sender = "device-1" if "device-1" in why else "device-0"
        got = cloud.handle(Message("middle", sender, "server", tensors, meta))
        assert got.kind == "middle_error" and why in got.meta["error"]
    # device-0's session survived the refusals
    again = cloud.handle(Message("middle", "device-0", "server", {"hidden": h[:, :1]}, {"pos": 3}))
    assert again.kind == "middle_out"


def test_drafter_option_errors_name_the_field_and_write_nothing(tiny_config, tmp_path):
    cfg = serve_config(tiny_config, name="nodrafter", options={"drafter": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"paradigm.options.drafter: no drafter at"):
        run_experiment(cfg, quiet=True, report=False)
    assert not (tmp_path / "runs" / "nodrafter").exists()
    other = random_drafter(tmp_path, cut=UCut(1, 2))
    cfg = serve_config(tiny_config, name="othercut", options={"drafter": str(other)})
    with pytest.raises(ConfigError, match=r"cut \{'n_in': 1, 'n_out': 2\}.*needs cut 1,1"):
        run_experiment(cfg, quiet=True, report=False)


def test_a_hat_drafter_run_serves_its_drafter(tiny_config):
    """hat_drafter distils the drafter federatedly; hat_serve takes that run directory."""
    drafted = run_experiment(drafter_config(tiny_config), quiet=True, report=False)
    cfg = serve_config(tiny_config, name="served", options={"drafter": str(drafted)})
    run_dir = run_experiment(cfg, quiet=True, report=False)
    s = served(run_dir)
    assert s["drafter"] == str(drafted) and all(r["ok"] for r in s["requests"])
    for r in s["requests"]:
        assert r["tokens"] == unsplit_greedy(run_dir, r["prompt"], 8, 1)[: len(r["tokens"])]


def test_a_fine_tuned_run_is_served_through_its_merged_export(tiny_config, tmp_path):
    """The documented route for a fine-tuned run: `cotune export --merged`, then that directory
    as model.name_or_path; the devices generate exactly what the fine-tuned model does."""
    from cotune.export import export_run

    tuned = run_experiment(tiny_config(**{**LM, "name": "tuned", "train": {"steps": 3, "lr": 0.05}}),
                           quiet=True, report=False)  # fmt: skip
    merged = export_run(tuned, tmp_path / "merged", merge=True)
    model = {"name_or_path": str(merged), "random_config": {}}
    cfg = serve_config(tiny_config, name="serve-tuned", model=model)
    run_dir = run_experiment(cfg, quiet=True, report=False)
    _, base, _, _ = load_run_model(run_dir, run_dir / "adapter")
    _, ft, _, _ = load_run_model(tuned, tuned / "adapter")
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(base.model.state_dict()[name], ft.model.state_dict()[name])  # served = tuned
    from cotune.config import load_config
    from cotune.models import load_model

    tcfg = load_config(tuned / "config.yaml")
    untuned = load_model(tcfg.model, vocab_size=ft.model.config.vocab_size, seed=tcfg.seed)
    assert not torch.equal(untuned.model.state_dict()[name], ft.model.state_dict()[name])
    for r in served(run_dir)["requests"]:
        assert (
            r["ok"] and r["tokens"] == unsplit_greedy(tuned, r["prompt"], 8, 1)[: len(r["tokens"])]
        )


def test_auto_prefill_chunk_is_chosen_per_device_from_its_declared_speeds(tiny_config):
    """prefill_chunk: auto — the server plans each device's chunk from the speeds it declared
    (here its simulated profile) and the cloud's, as `cotune infer` would for that pair."""
    from cotune.infer.plan import plan_prefill_chunk
    from cotune.sim.profiles import get_profile

    cfg = serve_config(tiny_config, name="auto", options={"prefill_chunk": "auto",
                       "prompt_tokens": 16}, devices={"count": 2, "profiles":
                       ["phone-low", "laptop-cpu"], "server": "a100"})  # fmt: skip
    run_dir = run_experiment(cfg, quiet=True, report=False)
    s = served(run_dir)
    _, loaded, _, _ = load_run_model(run_dir, run_dir / "adapter")
    for dev, prof in (("device-0", "phone-low"), ("device-1", "laptop-cpu")):
        want, ttfts = plan_prefill_chunk(loaded.anatomy, UCut(1, 1), 16, get_profile(prof),
                                         get_profile("a100"))  # fmt: skip
        got = s["prefill_chunks"][dev]
        assert got["chunk"] == want and got["profile"] == prof
        # (the run's model still carries its LoRA branches, counted; this one is merged)
        assert got["predicted_ttft_s"] == pytest.approx({str(k): v for k, v in ttfts.items()},
                                                        rel=1e-3)  # fmt: skip
        assert sorted(ttfts) == [8, 16]  # the whole prompt and its halves, down to 8
    for r in s["requests"]:  # chunking never changes the tokens
        assert (
            r["ok"]
            and r["tokens"] == unsplit_greedy(run_dir, r["prompt"], 8, 1)[: len(r["tokens"])]
        )
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["role"] for r in recs if r["event"] == "plan"] == ["device-0", "device-1"]


def test_prefill_chunk_option_is_checked(tiny_config):
    with pytest.raises(ConfigError, match=r"paradigm.options.prefill_chunk"):
        serve_config(tiny_config, options={"prefill_chunk": 0})
    with pytest.raises(ConfigError, match=r"paradigm.options.prefill_chunk"):
        serve_config(tiny_config, options={"prefill_chunk": "soon"})
