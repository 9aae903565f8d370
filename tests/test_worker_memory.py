"""Training workers keep freed memory for reuse: a full-size buffer allocated and freed every step in a
thread (as DeepSpeed's flat gradients are, in Ray Train's training thread) is not mapped again."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.train.config import load_train_config
from pipelines.train.driver import RETAIN_FREED_MEMORY_ENV, worker_env

STEPS_IN_A_THREAD = """
import json, resource, threading
import torch

faults = []

def steps():
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        flat = torch.empty(25_000_000)  # 100 MB, the size of a small model's flat gradients
        flat.fill_(1.0)
        del flat
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _faults_per_step(env: dict[str, str]) -> list[int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", STEPS_IN_A_THREAD], env=base | env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _config(retain: bool):
    return load_train_config({"name": "t", "data": {"uris": ["/nonexistent"]},
                              "scaling": {"retain_freed_memory": retain}})


def test_worker_env_carries_the_allocator_settings_only_when_asked():
    assert RETAIN_FREED_MEMORY_ENV.items() <= worker_env(_config(True)).items()
    assert not any(key.startswith("MALLOC_") for key in worker_env(_config(False)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    default = _faults_per_step({})
    retained = _faults_per_step({k: v for k, v in worker_env(_config(True)).items() if k.startswith("MALLOC_")})
    pages = 25_000_000 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert min(default[1:]) > pages // 2, default  # mapped again, page by page, every step
    # The heap grows by a few buffers while free blocks settle (memalign needs a little more than a freed
    # block holds); from then on every step reuses freed memory.
    assert max(retained[-8:]) < pages // 100, retained
