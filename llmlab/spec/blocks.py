"""The spec's building blocks: tokenizer, model, optimizers, training, LoRA and distributed blocks.

Stage blocks (`llmlab.spec.stages`) are made of these; data sources are `llmlab.data.sources.DataSource`,
next to the code that reads them. Never imports torch.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Iterator, Literal, Union

from pydantic import Field, model_validator

from llmlab.data.sources import DataSource
from llmlab.spec.base import Loc, StrictModel

# --------------------------------------------------------------------------- tokenizer


class TokenizerTrain(StrictModel):
    """Train a byte-level BPE tokenizer; it becomes the pipeline's first stage, `tokenizer`."""

    vocab_size: int = Field(4096, ge=300, description="includes special tokens")
    data: list[DataSource] = Field(min_length=1, description="text the tokenizer learns its merges from")
    min_frequency: int = Field(2, ge=1, description="merges seen fewer times are not learned")
    max_documents: int | None = Field(50_000, ge=1, description="documents read for training; None = all")


class TokenizerSpec(StrictModel):
    """Exactly one of: train a tokenizer, load one by hub name, or load one from a local path."""

    train: TokenizerTrain | None = Field(None, description="train a byte-level BPE tokenizer as the pipeline's first stage")
    name: str | None = Field(None, description="hub name, e.g. Qwen/Qwen2.5-0.5B (needs network)")
    path: str | None = Field(None, description="local tokenizer directory")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        given = [k for k in ("train", "name", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            yield (), f"give exactly one of train, name, path (got {', '.join(given) or 'none'})"


# --------------------------------------------------------------------------- model


class ModelSpec(StrictModel):
    """The decoder's architecture. The defaults are a Qwen2.5-0.5B-sized decoder (d_model 896, 24 layers,
    14 query / 2 KV heads, d_ff 4864); pipelines/tiny.yaml sets a 1M-parameter one."""

    positional_encoding: Literal["sinusoidal", "rope", "alibi", "yarn"] = Field(
        "rope", description="how positions enter attention: rope (rotary), yarn (rope stretched to longer contexts), "
                            "alibi (linear biases) or sinusoidal (added to the embeddings)")
    attention_type: Literal["mha", "mqa", "gqa"] = Field(
        "gqa", description="mha: a key/value head per query head; mqa: one shared; gqa: n_kv_heads groups")
    norm_type: Literal["layernorm", "rmsnorm"] = Field("rmsnorm", description="the normalisation before each sublayer")
    activation: Literal["relu", "gelu", "silu", "leaky_relu", "swiglu"] = Field(
        "swiglu", description="the feed-forward's activation; swiglu is gated (three projections)")
    d_model: int = Field(896, ge=8, description="hidden size")
    n_heads: int = Field(14, ge=1, description="query heads")
    n_kv_heads: int = Field(2, ge=1, description="key/value heads (gqa); mha = n_heads, mqa = 1")
    d_ff: int = Field(4864, ge=1, description="feed-forward inner size")
    n_layers: int = Field(24, ge=1, description="transformer blocks")
    max_seq_len: int = Field(1024, ge=8, description="training context length")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and feed-forward outputs while training")
    sliding_window: int | None = Field(None, ge=1, description="None = full causal attention")
    attention_bias: bool = Field(False, description="bias on q/k/v/o projections")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon inside each normalisation")
    tie_word_embeddings: bool = Field(True, description="share the input embedding with the output head")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE/YaRN base")
    yarn_scale: float = Field(4.0, ge=1.0, description="YaRN context-extension factor s")
    yarn_original_max_seq_len: int | None = Field(None, ge=8, description="YaRN's L; None = max_seq_len / s")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.d_model % self.n_heads:
            yield ("n_heads",), f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        elif (self.d_model // self.n_heads) % 2 and self.positional_encoding in ("rope", "yarn"):
            yield ("n_heads",), f"{self.positional_encoding} needs an even head size; d_model / n_heads = {self.d_model // self.n_heads}"
        if self.attention_type == "gqa" and self.n_heads % self.n_kv_heads:
            yield ("n_kv_heads",), f"gqa needs n_heads ({self.n_heads}) divisible by n_kv_heads ({self.n_kv_heads})"
        if self.attention_type == "mqa" and self.n_kv_heads != 1:
            yield ("n_kv_heads",), f"mqa means one KV head: set n_kv_heads: 1 (got {self.n_kv_heads})"
        if self.attention_type == "mha" and self.n_kv_heads != self.n_heads:
            yield ("n_kv_heads",), f"mha means n_kv_heads = n_heads: set n_kv_heads: {self.n_heads} (got {self.n_kv_heads})"
        if self.yarn_original_max_seq_len is not None and self.yarn_original_max_seq_len > self.max_seq_len:
            yield ("yarn_original_max_seq_len",), "must not exceed max_seq_len"

    @property
    def num_kv_heads(self) -> int:
        return {"mha": self.n_heads, "mqa": 1, "gqa": self.n_kv_heads}[self.attention_type]


# --------------------------------------------------------------------------- training


class AdamW(StrictModel):
    """torch.optim.AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101): Adam with decoupled weight decay."""

    name: Literal["adamw"] = Field("adamw", description="which optimizer")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="first-moment (momentum) decay")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="second-moment decay")
    eps: float = Field(1e-8, gt=0, description="added to the denominator")


class Adafactor(StrictModel):
    """torch.optim.Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): factored second moments, no
    first moment; the step is relative to each parameter's RMS. Defaults are torch's."""

    name: Literal["adafactor"] = Field("adafactor", description="which optimizer")
    beta2_decay: float = Field(-0.8, le=0.0, description="beta2_t = 1 - t^beta2_decay")
    eps1: float | None = Field(None, gt=0, description="floor of the second moment; None = dtype's machine eps")
    eps2: float = Field(1e-3, gt=0, description="floor of the parameter RMS that scales the step")
    d: float = Field(1.0, gt=0, description="update clipping threshold (on the update's RMS)")


class Lion(StrictModel):
    """Lion (Chen et al. 2023, arXiv 2302.06675): the sign of an interpolated momentum. Use a 3-10x
    smaller lr and a larger weight decay than AdamW (the paper's advice)."""

    name: Literal["lion"] = Field("lion", description="which optimizer")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="interpolation of momentum and gradient for the update")
    beta2: float = Field(0.99, ge=0.0, lt=1.0, description="momentum decay")


class Sophia(StrictModel):
    """Sophia-G (Liu et al. 2023, arXiv 2305.14342): momentum divided by an EMA of a diagonal
    Hessian estimate (Gauss-Newton-Bartlett, refreshed every `k` steps), clipped elementwise at
    `rho`: every parameter moves at most rho * lr per step (so lr is larger than AdamW's)."""

    name: Literal["sophia"] = Field("sophia", description="which optimizer")
    beta1: float = Field(0.965, ge=0.0, lt=1.0, description="gradient momentum decay")
    beta2: float = Field(0.99, ge=0.0, lt=1.0, description="Hessian-estimate EMA decay (per refresh)")
    rho: float = Field(0.04, gt=0, description="elementwise clip of m / h: |update| <= rho * lr")
    k: int = Field(10, ge=1, description="optimizer steps between Hessian estimates")
    eps: float = Field(1e-12, gt=0, description="floor of the Hessian estimate in the denominator")


class Muon(StrictModel):
    """Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): Newton-Schulz-orthogonalised
    momentum for 2-D hidden weight matrices; embeddings, the output head and 1-D parameters use AdamW
    at `adamw_lr_ratio` x lr."""

    name: Literal["muon"] = Field("muon", description="which optimizer")
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="momentum decay")
    nesterov: bool = Field(True, description="orthogonalise g + momentum * buf instead of buf")
    ns_steps: int = Field(5, ge=1, le=50, description="Newton-Schulz iterations")
    ns_dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs, fp32 on CPUs (where bf16 is many times slower)")
    adamw_lr_ratio: float = Field(0.1, gt=0, description="lr of the AdamW-handled parameters, relative to lr")
    adamw_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW part: first-moment decay")
    adamw_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW part: second-moment decay")
    adamw_eps: float = Field(1e-8, gt=0, description="AdamW part: denominator epsilon")


class SGD(StrictModel):
    """torch.optim.SGD with (heavy-ball or Nesterov) momentum: a step proportional to the gradient,
    where Adam-type optimizers move every parameter by about lr whatever its gradient's size: a
    gentler choice where gradients are mostly noise (RL on small models). lr is in gradient units,
    so it is larger than an Adam lr (~3e-3 rather than 1e-4 for GRPO on the demo's model)."""

    name: Literal["sgd"] = Field("sgd", description="which optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="momentum decay (0 = plain SGD)")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")
    dampening: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of each gradient left out of the momentum")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            yield ("nesterov",), "nesterov: true needs momentum > 0 and dampening 0 (torch's rule)"


OPTIMIZER_CLASSES: dict[str, type[StrictModel]] = {"adamw": AdamW, "adafactor": Adafactor, "lion": Lion, "sophia": Sophia,
                                                   "muon": Muon, "sgd": SGD}
OptimizerSpec = Annotated[Union[AdamW, Adafactor, Lion, Sophia, Muon, SGD], Field(discriminator="name")]
OPTIMIZER_NAMES = tuple(OPTIMIZER_CLASSES)


class TrainBase(StrictModel):
    """Training fields every training stage has. One step is one optimizer update, after
    `gradient_accumulation_steps` forward passes; what a forward pass holds is the stage's batch
    field, named for what it counts (TrainSpec: sequences, DpoTrain: pairs, RlTrain: prompts)."""

    max_steps: int = Field(10_000, ge=1, description="optimizer steps (updates) to train for")
    lr: float = Field(3e-4, gt=0, description="peak learning rate, reached after warmup")
    weight_decay: float = Field(0.1, ge=0, description="never applied to norms, biases or embeddings")
    scheduler: Literal["none", "cosine", "linear", "polynomial"] = Field(
        "cosine", description="the learning-rate decay after warmup, down to min_lr_ratio x lr at max_steps")
    warmup_steps: int = Field(1000, ge=0, description="linear warmup from 0, in optimizer steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the schedule's floor, as a fraction of lr")
    power: float = Field(1.0, gt=0, description="exponent of the polynomial schedule")
    gradient_accumulation_steps: int = Field(64, ge=1, description="forward passes per optimizer step")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None = no clipping")
    max_nonfinite_steps: int = Field(3, ge=1, description="a step whose loss or grad norm is NaN/inf is skipped; this many in a row stop the stage")
    eval_every: int = Field(500, ge=1, description="optimizer steps between validations")
    eval_at_start: bool = Field(
        False, description="also evaluate the starting model before step 1: curves start at its score, and with "
                           "save_best_only it stays the stage's model when no evaluated step beats it")
    min_improvement: float = Field(
        0.0, ge=0, description="an evaluation becomes the best only when it beats the best so far by more than this, "
                               "in the stage's best metric's units (0.04 = 4 points of exact match), so a noisy "
                               "held-out score does not hand on a step that drew lucky prompts")
    stop_at: float | None = Field(
        None, description="end the stage at the first evaluation after which its kept best reaches this value (at or "
                          "below for a loss, at or above for exact match or reward); max_steps stays the cap and the "
                          "schedule is laid over it. A target lands every seed at about the same quality")
    eval_steps: int = Field(100, ge=1, description="validation batches per evaluation")
    save_every: int = Field(500, ge=1, description="optimizer steps between resumable checkpoints")
    save_best_only: bool = Field(True, description="the exported model is the best validation one, not the last")
    log_every: int = Field(10, ge=1, description="optimizer steps between logged metrics")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast: auto = bf16 only on hardware fast at it")
    model_dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="weights: auto = bf16 frozen weights under LoRA on a bf16 GPU, else fp32")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each transformer block; auto = on CUDA only (no gain measured on CPUs)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, ~30% more compute")
    chunked_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="compute the loss (pretrain, sft) or log-probabilities (dpo, ppo, grpo) through llmlab's "
                            "LM head in chunks, never the full fp32 logits; auto = when they would exceed 256 MiB")
    loss_chunk_tokens: int = Field(4096, ge=1, description="positions per chunk")
    load_optimizer: bool = Field(True, description="on resume, restore optimizer state (false to switch optimizers)")
    optimizer: OptimizerSpec = Field(default_factory=AdamW, description="the optimizer by `name` (adamw when not given), with only its own fields")

    @model_validator(mode="after")
    def _fit_defaults(self) -> "TrainBase":
        """Defaults the user did not write fit a short run: warmup to a tenth of max_steps, and
        (with stop_at, which is checked at evaluations) eval_every to max_steps."""
        given = self.model_fields_set
        if "warmup_steps" not in given and self.warmup_steps > self.max_steps:
            self.warmup_steps = self.max_steps // 10
        if "eval_every" not in given and self.stop_at is not None and self.eval_every > self.max_steps:
            self.eval_every = self.max_steps
        return self

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.warmup_steps > self.max_steps:
            yield ("warmup_steps",), f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}): lower it"
        if self.stop_at is not None and self.eval_every > self.max_steps:
            yield ("stop_at",), (f"stop_at is checked at evaluations, and eval_every ({self.eval_every}) exceeds max_steps "
                                 f"({self.max_steps}): none would run; lower eval_every")
        if self.min_improvement and not self.save_best_only:
            yield ("min_improvement",), ("min_improvement only decides which evaluated step is kept, and save_best_only: "
                                         "false keeps the last one; drop min_improvement or set save_best_only: true")


class TrainSpec(TrainBase):
    """Training fields of pretrain (and, with other defaults, sft): a step is batch_sequences x
    gradient_accumulation_steps sequences (x the number of processes)."""

    renamed: ClassVar[dict[str, str]] = {
        "batch_size": "renamed to batch_sequences (sequences per forward pass; a step is batch_sequences x "
                      "gradient_accumulation_steps sequences)",
        "mini_batch_size": "this stage counts sequences: batch_sequences per forward pass x gradient_accumulation_steps"}

    batch_sequences: int = Field(1, ge=1, description="sequences per forward pass (per process)")


class LoraSpec(StrictModel):
    """LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685); presence turns LoRA on."""

    preset: Literal["minimal", "attention_only", "ffn_only", "all", "custom"] = Field("minimal", description="which projections")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(None, description="module names, only with preset: custom")
    train_special_tokens: bool = Field(True, description="also train special-token embeddings (chat markers a base model never saw)")
    train_embeddings: bool = Field(False, description="also train every row of the token embedding (and a tied output "
                                                       "head): what a small model needs to learn tokens its pretraining "
                                                       "rarely saw; folded in by merge like the adapters")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.preset == "custom" and not self.target_modules:
            yield ("target_modules",), "preset: custom needs target_modules (e.g. [q_proj, v_proj])"
        if self.preset != "custom" and self.target_modules:
            yield ("target_modules",), f"target_modules is only read with preset: custom (preset is {self.preset})"


class DistributedSpec(StrictModel):
    """Run the stage under torchrun: `nproc_per_node` processes on each of `nnodes` machines.
    Rank 0 alone writes checkpoints and logs; every rank trains on its own share of each batch, so
    one step's global batch is the stage's batch (batch_sequences, batch_pairs or batch_prompts) x
    gradient_accumulation_steps x world size."""

    nproc_per_node: int = Field(1, ge=1, description="processes per machine (GPUs per machine, or CPU workers)")
    nnodes: int = Field(1, ge=1, description="machines; more than 1 needs rdzv_endpoint (or $LLMLAB_RDZV_ENDPOINT)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: replicated weights; fsdp: FSDP2 shards weights, grads, optimizer state")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on GPUs, gloo on CPU")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (multi-node); None = $LLMLAB_RDZV_ENDPOINT or local")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes
