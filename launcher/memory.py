"""The memory a run needs per rank, by engine and world size, and whether it fits the GPU: the
plan (launcher/plan.py) calls `memory_setup` to read what decides it off the recipe and the
weightless model, `estimate` counts the bytes, and `describe` writes the plan's memory lines
with the verdict against the GPU (`gpu_memory`) and the changes that would make it fit.

State (parameters, gradients, AdamW moments, fp32 master weights) follows what each engine
here holds, as benchmarks/memory_scaling.py measures it (tests/test_sharding.py checks
the two agree): DDP keeps everything in the training dtype; DeepSpeed adds an fp32 master
copy of its partition (even in fp32) and shards gradients from stage 1 on (its stage 1 and 2
share one implementation), parameters at stage 3; FSDP keeps fp32 parameters, gradients and
moments, all sharded. Activations are what a decoder layer keeps for backward at
micro batch x the longest row (each micro-batch is padded to its longest), or only each layer's input
plus one recomputed layer under gradient checkpointing; logits are the output head's
[batch, seq, vocab] with the fp32 copies the cross-entropy makes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from launcher.recipe import Recipe

GIB = 2**30
# Left free for the CUDA context, NCCL buffers and allocator fragmentation.
HEADROOM = 0.10


@dataclass(frozen=True)
class Setup:
    """What decides a rank's memory; the fields a suggestion may change are the last ones."""

    params: int  # distinct parameters (tied weights once)
    lora_trainable: int  # LoRA r16 all-linear trainable parameters, for the "try LoRA" suggestion
    weight_bytes: int  # 2 for bfloat16/float16 training, 4 for float32
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    heads: int
    vocab: int  # 0: a classification head (no [seq, vocab] logits)
    seq_len: int
    loss_chunk_tokens: int  # chunked cross-entropy: the logits of this many tokens exist at once (0: all)
    eager_attention: bool  # eager attention keeps [heads, seq, seq] scores; sdpa/flash do not
    backend: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    reshard_after_forward: bool
    world: int
    trainable: int  # what is trained: params, or LoRA's adapters
    micro_batch: int
    gradient_checkpointing: bool


def gpu_memory(recipe: Recipe) -> tuple:
    """(bytes per GPU, where that number came from), or (None, None) with neither a GPU nor launch.gpu_memory_gib."""
    if recipe.launch.gpu_memory_gib:
        return recipe.launch.gpu_memory_gib * 2**30, "launch.gpu_memory_gib"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"the detected {props.name}"
    return None, None


def memory_setup(recipe: Recipe, config, skeleton, params: int, trainable, batches, world: int, sequence_head: bool, longest: int):
    """What decides a rank's memory in this recipe's run, from the model's config and weightless skeleton.
    `longest`: the longest training row; a padded micro-batch is padded to its longest row, so no step is
    longer. A packed micro-batch holds up to pack_tokens = micro batch x a row's tokens, planned as full."""
    micro = batches.micro_batch_size
    row = recipe.data.max_seq_len if batches.pack_tokens else min(longest, recipe.data.max_seq_len)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    # LoRA r 16 on every linear layer but the head: what "try LoRA" would train
    lora16 = sum(16 * (m.in_features + m.out_features) for name, m in skeleton.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith(("lm_head", "score", "classifier")))
    dtype = recipe.model.dtype
    if dtype == "auto":  # what the run will use where it runs: bfloat16 on a GPU
        dtype = "bfloat16" if gpu_memory(recipe)[0] is not None else "float32"
    st = recipe.strategy
    return Setup(
        params=params, lora_trainable=lora16, weight_bytes=4 if dtype == "float32" else 2,
        layers=text.num_hidden_layers, hidden=hidden, kv_hidden=getattr(text, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * hidden), heads=heads,
        vocab=0 if sequence_head else text.vocab_size, seq_len=row, loss_chunk_tokens=0 if sequence_head else recipe.train.loss_chunk_tokens,
        eager_attention=recipe.model.attn_implementation == "eager", backend=st.backend, zero_stage=st.zero_stage,
        offload_optimizer=st.offload_optimizer and st.backend == "deepspeed",
        offload_params=(st.offload_params and st.backend == "deepspeed") or (st.cpu_offload and st.backend == "fsdp"),
        reshard_after_forward=st.reshard_after_forward, world=world, trainable=params if trainable is None else trainable,
        micro_batch=micro, gradient_checkpointing=recipe.model.gradient_checkpointing,
    )


@dataclass(frozen=True)
class Memory:
    params: float
    grads: float
    optimizer: float  # AdamW moments
    master: float  # fp32 master weights (DeepSpeed's partition)
    gathered: float  # unsharded parameters a sharded engine holds while computing
    activations: float
    logits: float
    cpu: float  # offloaded to host memory (not in gpu_total)

    @property
    def state(self) -> float:
        """What benchmarks/memory_scaling.py measures: parameters, gradients, moments and master weights (GPU or CPU)."""
        return self.params + self.grads + self.optimizer + self.master + self.cpu

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.master + self.gathered + self.activations + self.logits


def estimate(s: Setup) -> Memory:
    P, T, w, N = s.params, s.trainable, s.weight_bytes, s.world
    block = P / max(s.layers, 1)  # parameters of one layer, roughly
    compute = w
    cpu = 0.0
    gathered = 0.0
    if s.backend == "deepspeed":
        shard = N if s.zero_stage >= 1 else 1
        params = w * P / (N if s.zero_stage == 3 else 1)
        grads = w * T / shard
        optimizer, master = 8 * T / shard, (4 * T / shard if s.zero_stage or w != 4 else 0.0)  # fp32 stage 0: torch's AdamW alone
        if s.offload_optimizer:
            cpu += optimizer + master
            optimizer = master = 0.0
        if s.zero_stage == 3:
            gathered = 2 * w * block if N > 1 else 0.0  # the layer computing and the one prefetched
            if s.offload_params:
                cpu += params
                params = 0.0
    elif s.backend == "fsdp":
        # fp32 shards; forward/backward gather a layer in the compute dtype (all of them without resharding)
        params, grads, optimizer, master = 4 * P / N, 4 * T / N, 8 * T / N, 0.0
        if N > 1 or w != 4:
            gathered = compute * (P if not s.reshard_after_forward else 2 * block)
        if s.offload_params:  # strategy.cpu_offload: parameters, gradients and optimizer state
            cpu += params + grads + optimizer
            params = grads = optimizer = 0.0
    else:  # ddp: every rank holds all of it; what is trained is fp32 (autocast computes in 16 bits), a frozen LoRA base 16-bit
        params, grads, optimizer, master = 4 * T + w * (P - T), 4 * T, 8 * T, 0.0
    tokens = s.micro_batch * s.seq_len
    per_layer = tokens * compute * (8 * s.hidden + 2 * s.kv_hidden + 4 * s.intermediate)
    if s.eager_attention:
        per_layer += 2 * s.micro_batch * s.heads * s.seq_len**2 * compute
    if s.gradient_checkpointing:
        activations = s.layers * tokens * s.hidden * compute + per_layer
    else:
        activations = s.layers * per_layer
    # head output, its fp32 copy (none when already fp32), log-softmax saved for backward, and its gradient
    logit_tokens = min(tokens, s.loss_chunk_tokens) if s.loss_chunk_tokens else tokens
    logits = logit_tokens * s.vocab * (compute + (4 if compute != 4 else 0) + 8)
    return Memory(params, grads, optimizer, master, gathered, activations, logits, cpu)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB or n == 0 else f"{n / 2**20:.1f} MiB"


def _engine(s: Setup) -> str:
    if s.backend == "deepspeed":
        return f"ZeRO-{s.zero_stage}"
    return "FSDP2" if s.backend == "fsdp" else "DDP"


def _suggestions(s: Setup, budget: float) -> list:
    """Single changes that bring the estimate under the budget, smallest first."""
    options = []
    if not (s.backend == "deepspeed" and s.zero_stage == 3) and s.backend != "fsdp" and s.world > 1:
        options.append(("strategy.backend=deepspeed strategy.zero_stage=3", replace(s, backend="deepspeed", zero_stage=3)))
    sharded = s if s.backend == "fsdp" or (s.backend == "deepspeed" and s.zero_stage == 3) else replace(s, backend="deepspeed", zero_stage=3)
    for n in (2, 4, 8, 16, 32, 64, 128, 256):
        if n > s.world and estimate(replace(sharded, world=n)).gpu_total <= budget:
            engine = "" if sharded is s else " with ZeRO-3"
            options.append((f"{n} ranks{engine}", replace(sharded, world=n)))
            break
    if not s.gradient_checkpointing:
        options.append(("model.gradient_checkpointing=true", replace(s, gradient_checkpointing=True)))
    if s.trainable == s.params and s.lora_trainable:
        options.append(("lora.enabled=true (r 16, all-linear)", replace(s, trainable=s.lora_trainable)))
    if s.micro_batch > 1:
        options.append(("train.micro_batch_size=1 (raise gradient_accumulation_steps to keep the global batch)", replace(s, micro_batch=1)))
    if s.backend == "deepspeed" and s.zero_stage >= 1 and not s.offload_optimizer:
        options.append(("strategy.offload_optimizer=true", replace(s, offload_optimizer=True)))
    fits = [(what, estimate(x).gpu_total) for what, x in options if estimate(x).gpu_total <= budget]
    return sorted(fits, key=lambda f: -f[1])  # the gentlest change (most memory left in use) first


def _everything(s: Setup) -> Setup:
    """Every change at once (ZeRO-3 at this world size), for when no single one is enough."""
    return replace(s, backend="deepspeed" if s.backend != "fsdp" else "fsdp", zero_stage=3, gradient_checkpointing=True,
                   trainable=min(s.trainable, s.lora_trainable or s.trainable), micro_batch=1, offload_optimizer=True)


def describe(s: Setup, gpu_bytes: "float | None", gpu_source: str) -> list:
    """The plan's memory lines."""
    m = estimate(s)
    ckpt = "on" if s.gradient_checkpointing else "off"
    lines = [
        f"memory       per rank ({_engine(s)}, {s.world} rank{'s' if s.world > 1 else ''}, {'float32' if s.weight_bytes == 4 else '16-bit'} training): "
        f"parameters {_gib(m.params)}, gradients {_gib(m.grads)}, AdamW state {_gib(m.optimizer)}, master weights {_gib(m.master)}"
        + (f", gathered layers {_gib(m.gathered)}" if m.gathered else ""),
        f"             activations {_gib(m.activations)} (micro {s.micro_batch} x {s.seq_len} tokens, the longest row; gradient checkpointing {ckpt}), "
        f"logits {_gib(m.logits)}; total ~{_gib(m.gpu_total)} on the GPU" + (f", {_gib(m.cpu)} offloaded to CPU" if m.cpu else ""),
    ]
    if gpu_bytes is None:
        lines.append("             no GPU here: set launch.gpu_memory_gib to check that it fits")
        return lines
    budget = (1 - HEADROOM) * gpu_bytes
    if m.gpu_total <= budget:
        lines.append(f"             fits {gpu_source} of {_gib(gpu_bytes)} ({100 * m.gpu_total / gpu_bytes:.0f}%, {HEADROOM:.0%} kept free)")
        return lines
    fixes = _suggestions(s, budget)
    text = ("; ".join(f"{what} (~{_gib(total)})" for what, total in fixes) if fixes else
            f"no single change does; all of ZeRO-3, gradient checkpointing, LoRA, micro batch 1 and optimizer offload "
            f"together need ~{_gib(estimate(_everything(s)).gpu_total)}: add ranks or a larger GPU")
    lines.append(f"             does NOT fit {gpu_source} of {_gib(gpu_bytes)} ({HEADROOM:.0%} kept free); what would: {text}")
    return lines
