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
