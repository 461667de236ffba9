"""`make demo` end to end, with a small model: it pulls from its in-process origin and checks
the files itself."""

import subprocess
import sys


def test_demo_pulls_its_model_and_reports_the_origin_bytes(tmp_path):
    done = subprocess.run([sys.executable, "-m", "p2pull.demo", "--workdir", str(tmp_path),
                           "--scale", "0.02"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "match the source byte for byte" in done.stdout
    assert "origin served" in done.stdout and "(1.000x the model" in done.stdout
    assert (tmp_path / "out" / "config.json").is_file()
