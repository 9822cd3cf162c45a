"""Sharded training without a GPU: make accelerate honour FSDP2 and DeepSpeed launch configs on CPU processes, and
shard the frozen reference model the way the policy is sharded.

Why this exists (accelerate 1.16, measured on 2 CPU processes):
- An FSDP config on CPUs runs as plain data parallelism: `AcceleratorState` picks FSDP only for GPU-like process
  groups, so the weights stay whole on every process. FSDP2's `fully_shard` itself runs on CPU with gloo, and
  accelerate's FSDP2 preparation, checkpointing and state-dict gathering work once the state says FSDP.
- A DeepSpeed config needs `Accelerator(cpu=False)` (with `cpu=True` accelerate drops DeepSpeed), and then each
  process's `Accelerator` reports 1 process and index 0 although DeepSpeed's gloo group has them all: every process
  would read all the data. The weights are partitioned correctly; only accelerate's counts are wrong.

`honour_launch_config` repairs both after the `Accelerator` is built, and says in one line what runs. On GPUs it
changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

FSDP, DEEPSPEED = "FSDP", "DeepSpeed"


def requested_launch() -> str | None:
    """The sharding the `accelerate launch` config asked for (FSDP or DeepSpeed), from the variables it sets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return DEEPSPEED
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return FSDP
    return None


def accelerator_on_cpu() -> bool:
    """The `cpu` argument for `Accelerator`: True without CUDA, except under DeepSpeed, which accelerate drops then."""
    return not torch.cuda.is_available() and requested_launch() != DEEPSPEED


def honour_launch_config(accelerator) -> str | None:
    """Make a CPU run do the sharding its launch config asked for; return the line that says what runs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    wanted = requested_launch()
    if wanted is None or torch.cuda.is_available():
        return None
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    shared = (PartialState._shared_state, AcceleratorState._shared_state)
    if wanted == DEEPSPEED and accelerator.distributed_type == DistributedType.DEEPSPEED:
        if accelerator.num_processes != world:  # accelerate saw no GPU backend and counted one process
            for state in shared:
                state.update(
                    num_processes=world,
                    process_index=dist.get_rank(),
                    local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                    backend=dist.get_backend(),
                )
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage} on {world} CPU process(es) ({dist.get_backend() if world > 1 else 'one'})"
    if wanted == FSDP and accelerator.distributed_type == DistributedType.MULTI_CPU:
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        if plugin.fsdp_version != 2:
            return (
                f"note: the launch config asks for FSDP version {plugin.fsdp_version}, which accelerate runs only on "
                f"GPUs; this run is MULTI_CPU with {world} process(es), weights replicated (fsdp_version: 2 shards "
                "them on CPUs)"
            )
        for state in shared:
            state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        return f"FSDP2 on {world} CPU process(es) (gloo): parameters, gradients and optimizer state sharded"
    return (
        f"note: the launch config asks for {wanted}, which this run cannot honour here; it is "
        f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es), weights replicated"
    )


def is_sharded(accelerator) -> bool:
    """Whether the policy's weights are split across processes (FSDP, or DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


@contextlib.contextmanager
def whole_weights_on_every_process():
    """Load a model with its weights on every process. Under FSDP with `fsdp_cpu_ram_efficient_loading`,
    transformers loads real weights on the first process only (the others get empty ones that accelerate's
    preparation fills); a model Zephyr shards itself (the reference) needs them everywhere."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def shard_reference(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen reference model, placed as the policy is: FSDP2-sharded by decoder layer, a DeepSpeed inference
    engine (partitioned under ZeRO-3), or as accelerate prepares a model for evaluation (device and autocast). Sharded
    references are not registered with the accelerator, so their checkpoints hold only the policy."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return _fully_shard(model, accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_inference_engine(model, accelerator)
    return accelerator.prepare_model(model, evaluation_mode=True)


def _fully_shard(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    mp = policy if isinstance(policy, MixedPrecisionPolicy) else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _deepspeed_inference_engine(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """An engine with no optimizer: ZeRO-3 keeps the weights partitioned and gathers each layer for its forward;
    under ZeRO-1/2 (stage 0 here) it holds the whole model. Bucket sizes as for the policy, scaled to the model."""
    import deepspeed

    config = _without_auto(copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config))
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = getattr(model.config, "hidden_size", None)
        if hidden:
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=0,
            )
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _without_auto(config: dict) -> dict:
    """A DeepSpeed config without the "auto" values that accelerate fills only when it prepares the policy."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}


def parameter_share(model: torch.nn.Module) -> float:
    """The fraction of the model's parameter elements that this process holds: 1.0 replicated, about 1/N when
    sharded over N processes (FSDP2 DTensor shards, ZeRO-3 partitions)."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: the local partition, padded to equal sizes
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / max(total, 1)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP or DeepSpeed wrapper (FSDP2 shards in place and wraps nothing)."""
    return getattr(model, "module", model)
