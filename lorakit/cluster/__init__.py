"""Running lorakit on a Ray cluster (https://docs.ray.io): the connection shared by the Ray
sweep backend (lorakit/sweep/ray_tune.py) and Ray Serve replicas (lorakit/serve/ray_serve.py).
docs/cluster.md says what each node needs."""

from lorakit.cluster.runtime import connect, require_ray

__all__ = ["connect", "require_ray"]
