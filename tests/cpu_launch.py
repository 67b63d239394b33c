"""``mmrwkv`` with FSDP or DeepSpeed on CPU gloo ranks, for tests/test_sharded.py.

accelerate turns ``distributed_type: FSDP`` or ``DEEPSPEED`` into that backend only on
accelerators (CUDA, XPU, ...): on CPU ranks FSDP stays plain multi-process (DDP), and DeepSpeed
gets no process group at all (each rank believes it is alone). PyTorch's FSDP2 (``fully_shard``)
and DeepSpeed's CPU accelerator both run on CPU with gloo, so this launcher fills those two gaps in
accelerate's process state, then runs the real CLI: accelerate's own FSDP / DeepSpeed code paths
(sharded model and optimiser, sharded checkpoints, full-state export) are what the tests exercise.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        tests/cpu_launch.py train RECIPE.yaml --set ...          (FSDP: with ACCELERATE_USE_CPU=1)
"""
import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_state_init = AcceleratorState.__init__
_prepare_backend = PartialState._prepare_backend
_plugin = []


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    # AcceleratorState is a shared-state singleton that re-reads the process state on every
    # construction, so the override is re-applied each time, with the plugin the Accelerator gave.
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        _plugin[:] = [fsdp_plugin]
    if _plugin and getattr(self, "distributed_type", None) == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


def _deepspeed_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    # no accelerator -> accelerate picks no backend; DeepSpeed's CPU accelerator speaks gloo
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if (backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return "gloo", DistributedType.MULTI_CPU
    return backend, distributed_type


AcceleratorState.__init__ = _fsdp_on_cpu
PartialState._prepare_backend = _deepspeed_gloo

if __name__ == "__main__":
    from multimodal_rwkv.cli import main

    sys.exit(main(sys.argv[1:]))
