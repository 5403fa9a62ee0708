"""Device processes forked from the preloaded forkserver (deploy/procs.py)."""

import subprocess
import sys
import textwrap


def test_a_launcher_script_without_a_main_guard_runs_once(tmp_path):
    """multiprocessing re-imports the parent's __main__ in its children; a forked device must
    not, or a plain script calling `launch` would start the run again from every device."""
    script = tmp_path / "launcher.py"
    script.write_text(
        textwrap.dedent(f"""
        import os
        from cotune.deploy.procs import start_cotune
        print("launcher ran", flush=True)
        p = start_cotune(["datasets"], dict(os.environ), {str(tmp_path / "child.log")!r})
        print("exit", p.wait(timeout=120), flush=True)
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.stdout.count("launcher ran") == 1, out.stdout + out.stderr
    assert "exit 0" in out.stdout, out.stdout + out.stderr
    assert "fortunes" in (tmp_path / "child.log").read_text()  # the child ran `cotune datasets`


def _write_loaded_modules(path):
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(sorted(sys.modules)))


def test_a_forked_device_starts_with_what_building_its_node_imports(tmp_path):
    """A device builds its node right after it forks: transformers' model base (~3 s of imports
    with scipy, sympy and accelerate), the model family and cotune's node modules must already
    be loaded in the forkserver, or every device of every launch imports them again."""
    import json

    from cotune.deploy import procs

    child = procs.fork(_write_loaded_modules, (str(tmp_path / "mods.json"),))
    child.join(120)
    assert child.exitcode == 0
    loaded = set(json.loads((tmp_path / "mods.json").read_text()))
    for name in ("transformers.modeling_utils", "transformers.models.bert.modeling_bert",
                 "cotune.nodes", "cotune.peft.lora", "cotune.sim.simulation"):  # fmt: skip
        assert name in loaded, name


def test_the_preload_covers_every_model_type_cotune_can_cut():
    from cotune.deploy.procs import MODEL_FAMILIES, PRELOAD
    from cotune.models.loading import MODEL_TYPES

    assert set(MODEL_FAMILIES) == set(MODEL_TYPES)
    for t in MODEL_TYPES:
        assert f"transformers.models.{t}.modeling_{t}" in PRELOAD
