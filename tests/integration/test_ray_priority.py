"""A local Ray started by a command runs its workers (tasks, actors: sweep trials, Ray Train
workers, memorization models) at the command's own niceness, not 15 below it as Ray would: on a
machine shared with other work a nice-15 worker gets a few percent of a core.

A real local Ray in a child process started under ``nice -n 3``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

pytest.importorskip("ray")

CHILD = """
import json, os
from sharp_unlearn.ray_cluster import ray_session

with ray_session(num_cpus=1, log_to_driver=False) as ray:
    task = ray.remote(lambda: os.nice(0))

    @ray.remote
    class Probe:
        def niceness(self):
            return os.nice(0)

    print(json.dumps({"driver": os.nice(0), "task": ray.get(task.remote()),
                      "actor": ray.get(Probe.remote().niceness.remote())}))
"""


@pytest.mark.parametrize("user_setting", [None, "2"])
def test_workers_of_a_local_ray_keep_the_commands_niceness(tmp_path, user_setting):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    if user_setting is not None:  # the user's own choice: an increment on top of the command's
        env["RAY_worker_niceness"] = user_setting
    done = subprocess.run(["nice", "-n", "3", sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    expected = 3 + int(user_setting or 0)
    assert seen["driver"] == 3 and seen["task"] == expected and seen["actor"] == expected, seen
