"""Build a model the way p3d.train does and report how much memory building it took on each rank.

    torchrun --nproc_per_node=N tests/distributed/helpers/build_memory.py OUT.json key=value ...
"""

import json
import resource
import sys

import torch.distributed as dist

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.distributed.env import init_distributed, shutdown, world_size_from_env
from p3d.distributed.mesh import Meshes
from p3d.parallel.parallelize import build_parallel_model


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(out_path: str, overrides: list[str]) -> None:
    config = to_object(compose(overrides))
    setup = validate(config, world_size_from_env())
    env = init_distributed(config.dist)
    meshes = Meshes(setup.dims, env.device.type)
    before = peak_rss_gb()
    model = build_parallel_model(config, setup.hf_config, setup.tp_plan, meshes, env.device)
    growth = peak_rss_gb() - before
    full_gb = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    largest_tensor_gb = max(p.numel() for p in model.parameters()) * 4 / 2**30
    growths = [None] * dist.get_world_size()
    dist.all_gather_object(growths, growth)
    if env.is_main:
        with open(out_path, "w") as stream:
            json.dump({"full_model_gb": full_gb, "largest_tensor_gb": largest_tensor_gb, "build_growth_gb_per_rank": growths}, stream)
    del model
    shutdown(meshes.world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
