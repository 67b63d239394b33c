"""``mmrwkv`` with FSDP on CPU gloo ranks, for tests/test_fsdp.py.

accelerate turns ``distributed_type: FSDP`` (``ACCELERATE_USE_FSDP``) into FSDP only on
accelerators (CUDA, XPU, ...); on CPU ranks it stays plain multi-process (DDP). PyTorch's FSDP2
(``fully_shard``) itself runs on CPU with gloo, so this launcher makes accelerate's state report
FSDP there too, then runs the real CLI: accelerate's own FSDP code paths (sharding each block,
sharded checkpoints, full-state export) are what the test exercises.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \
        tests/fsdp_cpu_launch.py train RECIPE.yaml --set ...      (with ACCELERATE_USE_CPU=1)
"""
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__
_plugin = []


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    # AcceleratorState is a shared-state singleton that re-reads the process state on every
    # construction, so the override is re-applied each time, with the plugin the Accelerator gave.
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        _plugin[:] = [fsdp_plugin]
    if _plugin and getattr(self, "distributed_type", None) == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from multimodal_rwkv.cli import main

    sys.exit(main(sys.argv[1:]))
