"""`pretrain`: a language model from scratch: a BPE tokenizer trained on the corpus (or a given one),
a Llama- or Qwen3-architecture model initialised from a size preset or explicit dimensions, and causal-LM
training on the text. The tokenizer reserves the chat template's special tokens so the same model
can go on to SFT, DPO and GGUF export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions
from llmforge_plugins.training.options import TemplateChecks, TrainOptions

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv, Shape


class ModelShape(StageOptions):
    architecture: Literal["llama", "qwen3"] = Field(
        "llama",
        description="llama (LlamaForCausalLM), or qwen3 (Qwen3ForCausalLM: RMSNorm on each head's queries and "
        "keys, an explicit head_dim). The size presets apply to both.",
    )
    size: Literal["tiny", "mini", "small", "base", "smollm-135m"] = Field(
        "mini", description="Size preset (tiny ~0.1M params for tests, mini ~5M, small ~30M, base ~100M)."
    )
    hidden_size: int | None = Field(None, gt=0, description="Override the preset's hidden size.")
    num_hidden_layers: int | None = Field(None, gt=0, description="Override the number of layers.")
    num_attention_heads: int | None = Field(None, gt=0, description="Override the number of attention heads.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Override the KV heads (grouped-query attention).")
    intermediate_size: int | None = Field(None, gt=0, description="Override the MLP width.")
    head_dim: int | None = Field(
        None, gt=0, description="Width of each attention head (default hidden_size / num_attention_heads)."
    )
    tie_embeddings: bool = Field(True, description="Share input and output embeddings.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")


class PretrainOptions(TrainOptions):
    data: DataOptions = Field(description="Text data (text rows, .txt files).")
    tokenizer: Annotated[str | None, Input("model", "tokenizer")] = Field(
        None, description="Use this tokenizer (a HF dir) instead of training one."
    )
    vocab_size: int = Field(4096, ge=300, description="Vocabulary size of the trained tokenizer.")
    template: str = Field("chatml", description="Chat template whose special tokens the tokenizer reserves.")
    model: ModelShape = Field(default_factory=ModelShape, description="Architecture (Llama or Qwen3) and size.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")


class PretrainStage(TemplateChecks, Stage):
    kind = "pretrain"
    summary = "Train a tokenizer and a Llama- or Qwen3-architecture model from scratch on text."
    Options = PretrainOptions
    produces = ("model",)
    cache_libraries = ("torch", "transformers", "trl", "tokenizers")

    def estimate(self, options: PretrainOptions, env: PlanEnv) -> Estimate:
        # Planning: the model this stage builds (its size preset), trained with these options.
        from llmforge_plugins.training.estimate import pretrain_shape, training_estimate

        return training_estimate(options, env, pretrain_shape(options, env))

    def output_shape(self, options: PretrainOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.training.estimate import pretrain_shape

        return pretrain_shape(options, env)

    def run(self, options: PretrainOptions, ctx: StageContext) -> Produced | None:
        from llmforge.chat import resolve_template
        from llmforge_plugins.training import common, factory, loop, models

        seed = common.seed_of(options, ctx)
        models.set_seed(seed)
        ds = common.load_rows(options.data, ctx, expect=("text",))
        if options.tokenizer:
            tokenizer = models.load_tokenizer(options.tokenizer, options.trust_remote_code)
            template = resolve_template(
                options.template, ctx.registry.chat_templates, tokenizer, base_dir=ctx.project_dir
            )
        else:
            template = resolve_template(options.template, ctx.registry.chat_templates, None, base_dir=ctx.project_dir)
            tokenizer = models.train_tokenizer((r["text"] for r in ds.rows), options.vocab_size, template)
            ctx.log(f"trained a byte-level BPE tokenizer: {len(tokenizer)} tokens")
        shape = options.model.model_dump()
        preset = shape.pop("size")
        config = models.model_config(preset, len(tokenizer), options.max_length, shape, tokenizer)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)  # the architecture's class: Llama or Qwen3
        models.prepare_tokenizer(model, tokenizer, template)
        common.record_template(ctx, template)
        n_params = sum(p.numel() for p in model.parameters())
        ctx.log(f"model: {type(model).__name__} {preset}, {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}")
        ctx.info["parameters"] = n_params
        train, evals = common.tokenize_split(ctx, ds.rows, "text", tokenizer, template, options)
        training = factory.build_trainer(
            factory.SFT, ctx=ctx, opts=options, model=model, tokenizer=tokenizer, train_rows=train, eval_rows=evals
        )
        outcome = loop.run_trainer(training, ctx)
        if outcome.stopped:
            return None  # stopped: the runner records it so and keeps the checkpoint
        common.save_outputs(ctx, training.trainer, tokenizer, template, None, False)
        outcome.record(ctx)
        return ctx.published
