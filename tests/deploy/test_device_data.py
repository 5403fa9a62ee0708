"""`cotune device --data FILE`: a device trains on its own file, labelled and tokenized as the
server's run; the server learns its size when it joins. Files holding exactly the shards the
config's partition would give must reproduce the partitioned run bit for bit."""

import json

import pytest
import torch

pytest.importorskip("grpc")

from cotune.build import build_experiment  # noqa: E402
from cotune.config import DataSection  # noqa: E402
from cotune.data.loading import load_device_file  # noqa: E402
from cotune.deploy.launch import device_files, launch  # noqa: E402
from cotune.errors import ConfigError, DataError, PeerUnavailable  # noqa: E402
from tests.paradigms.test_engines import outcome  # noqa: E402


def write_shards(cfg, out):
    """Each device's shard of the config's partition, as its own JSONL file."""
    exp, _ = build_experiment(cfg, out / "unused", quiet=True)
    try:
        names = exp.data.label_names
        out.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(exp.parts):
            rows = [{"text": exp.data.train[j].text, "label": names[exp.data.train[j].label]}
                    for j in part]  # fmt: skip
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (out / f"device-{i}.jsonl").write_text(text)
    finally:
        exp.grid.close()
    return out


@pytest.mark.slow
def test_devices_with_their_own_files_equal_the_partitioned_run(tiny_config, tmp_path):
    sections = {"paradigm": {"name": "fedavg"}, "engine": {"request_timeout_s": 60}}
    want = outcome(launch(tiny_config(name="shards", **sections), quiet=True, report=False))
    data_dir = write_shards(tiny_config(name="x", **sections), tmp_path / "files")
    got = outcome(
        launch(tiny_config(name="files", **sections), quiet=True, data_dir=data_dir, report=False)
    )
    assert got[0] == want[0]  # losses, accuracy, bytes, simulated time: all from the same data
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)


def test_a_device_file_with_a_label_the_run_does_not_know_stops_the_run(tiny_config, tmp_path):
    # No data.labels: (with it, records of other labels are left out, as on the server)
    sections = {"paradigm": {"name": "fedavg"}, "data": {"labels": []}}
    data_dir = write_shards(tiny_config(**sections), tmp_path / "files")
    bad = data_dir / "device-1.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps({"text": "a new topic", "label": "cooking"})
    bad.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(name="bad", engine={"join_timeout_s": 60}, **sections)
    with pytest.raises(PeerUnavailable, match=r"device-1\.jsonl:3: label 'cooking'"):
        launch(cfg, quiet=True, data_dir=data_dir, report=False)


def test_load_device_file_uses_the_runs_label_ids(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("body,topic\nhello,b\nworld,a\n")
    data = DataSection(dataset="fortunes", text_field="body", label_field="topic")
    got = load_device_file(str(f), data, "classification", ["a", "b", "c"], None)
    assert [(e.text, e.label) for e in got.train] == [("hello", 1), ("world", 0)]
    assert got.test == [] and got.label_names == ["a", "b", "c"]
    lm = load_device_file(str(f), data, "causal_lm", None, ["a", "b"])
    assert [(e.label, e.domain) for e in lm.train] == [(None, 1), (None, 0)]
    plain = load_device_file(str(f), data, "causal_lm", None, None)
    assert [e.group for e in plain.train] == [None, None]
    with pytest.raises(DataError, match=r"mine\.csv:3: label 'a' \(field 'topic'\)"):
        load_device_file(str(f), data, "classification", ["b"], None)


def test_device_files_finds_one_file_per_device(tmp_path):
    (tmp_path / "device-0.jsonl").write_text("{}\n")
    (tmp_path / "device-1.csv.gz").write_bytes(b"")
    assert set(device_files(tmp_path, ["device-0", "device-1"])) == {"device-0", "device-1"}
    with pytest.raises(ConfigError, match="no device-2"):
        device_files(tmp_path, ["device-0", "device-2"])
    (tmp_path / "device-0.tsv").write_text("")
    with pytest.raises(ConfigError, match="several files"):
        device_files(tmp_path, ["device-0"])


def test_devices_get_the_servers_chat_template_not_its_path(tiny_config, tmp_path):
    """A template file named in the config lives on the server's machine: joining devices
    are sent its text and render with a copy of it; the launched run equals the local one."""
    from pathlib import Path

    from cotune.data.chat import BUILTIN
    from cotune.deploy.device_inputs import with_chat_template
    from cotune.deploy.launch import welcome
    from cotune.run import run_experiment

    template = tmp_path / "chat.jinja"
    template.write_text(BUILTIN["chatml"].read_text())
    sections = {
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 64,
                  "random_config": {"n_layer": 2}},
        "data": {"dataset": "fortunes", "view": "instruct", "labels": [], "max_examples": 40,
                 "chat_template": str(template), "system_prompt": "Name the file."},
        "peft": {"target_modules": ["c_attn"]},
        "paradigm": {"name": "fedavg"}, "train": {"steps": 2},
    }  # fmt: skip
    exp, _ = build_experiment(tiny_config(name="w", **sections), tmp_path / "w", quiet=True)
    try:
        told = welcome(exp)
    finally:
        exp.grid.close()
    assert told["chat_template"] == template.read_text()
    cfg = with_chat_template(exp.cfg, told, tmp_path / "device")
    copy = Path(cfg.data.chat_template)
    assert copy.parent == tmp_path / "device" and copy.read_text() == template.read_text()
    assert cfg.data.system_prompt == "Name the file." and exp.cfg.data.chat_template == str(
        template
    )
    want = outcome(run_experiment(tiny_config(name="local", **sections), quiet=True, report=False))
    got = outcome(launch(tiny_config(name="grpc", **sections), quiet=True, report=False))
    assert got[0] == want[0]
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)


def test_devices_sharing_a_process_cannot_bring_their_own_files(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="--devices-per-process 2: --data-dir .* needs a process"):
        launch(tiny_config(), quiet=True, data_dir=tmp_path, devices_per_process=2)
    with pytest.raises(ConfigError, match="--devices-per-process: must be >= 1, got 0"):
        launch(tiny_config(), quiet=True, devices_per_process=0)
