"""One local Ray runtime for the Ray tests of a pytest process (Ray takes seconds to start).

`local_ray()` starts it on first use (2 CPUs, no dashboard, usage statistics off) and returns the
address a second driver can join it at (`--address`); it stays up until the process ends, when
Ray's own exit hook stops it. Workers inherit this process's environment at that moment.
"""

import os


def local_ray() -> str:
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                        "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(name, value)
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray.get_runtime_context().gcs_address
