"""`make demo` end to end, with a small model and two daemons: it pulls from its in-process
origin through the swarm and checks every node's files itself."""

import re
import subprocess
import sys


def test_demo_pulls_on_every_node_and_the_origin_serves_the_model_once(tmp_path):
    done = subprocess.run([sys.executable, "-m", "p2pull.demo", "--workdir", str(tmp_path),
                           "--scale", "0.05", "--nodes", "3"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every node's files match the source byte for byte" in done.stdout
    ratio = float(re.search(r"for 3 nodes: ([0-9.]+)x the model", done.stdout).group(1))
    assert ratio <= 1.1
    rows = re.findall(r"^\d\s+[0-9.]+\s+([0-9.]+) MiB\s+([0-9.]+) MiB$", done.stdout, re.M)
    assert len(rows) == 3
    assert sum(float(peers) for _, peers in rows) > 0  # the nodes shared chunks
