from mesh.backends.base import (BACKENDS, DTYPES, Shard, ShardCache, StepItem,
                                available_backends, default_backend, load_shard)

__all__ = ["BACKENDS", "DTYPES", "Shard", "ShardCache", "StepItem", "available_backends",
           "default_backend", "load_shard"]
