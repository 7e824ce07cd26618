"""`sft`: supervised fine-tuning on chat data: full, LoRA, or QLoRA (CUDA).

Rows are rendered with the chat template and only assistant turns are trained by default; TRL's
SFTTrainer packs the tokenized rows (best-fit, padding-free) and trains. The template travels with
the output model so export and chat use exactly it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext
from llmforge_plugins.training.options import LoraOptions, TemplateChecks, TrainOptions, adapter_outputs

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv, Shape


class SftOptions(TrainOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(description="Base model: a HF directory or @stage.")
    data: DataOptions = Field(description="Chat data (messages, sharegpt or alpaca rows).")
    template: str | None = Field(
        None,
        description="Chat template: a name (chatml, qwen, llama3, gemma, phi3, mistral, alpaca), "
        "a .jinja file, or unset for the tokenizer's own.",
    )
    train_on: Literal["assistant", "all", "last_turn"] = Field("assistant", description="Which tokens carry loss.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA / QLoRA settings.")
    merge: bool = Field(False, description="With LoRA: also write the base with the adapter merged in.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")


class SftStage(TemplateChecks, Stage):
    kind = "sft"
    summary = "Supervised fine-tuning on chat data (full, LoRA, QLoRA); loss on assistant turns."
    Options = SftOptions
    produces = ("model", "adapter")
    cache_libraries = ("torch", "transformers", "trl", "peft")

    def outputs(self, options) -> tuple[str, ...]:
        return adapter_outputs(options)

    def estimate(self, options: SftOptions, env: PlanEnv) -> Estimate:
        # Planning: the model input's shape (through @references), trained with these options.
        from llmforge_plugins.training.estimate import training_estimate

        return training_estimate(options, env, env.shape_of("model"))

    def output_shape(self, options: SftOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.training.estimate import trained_shape

        return trained_shape(options, env.shape_of("model"))

    def run(self, options: SftOptions, ctx: StageContext) -> Produced | None:
        from llmforge.chat import resolve_template
        from llmforge_plugins.training import common, factory, loop, models

        common.check_qlora(options.lora)
        models.set_seed(common.seed_of(options, ctx))
        ds = common.load_rows(options.data, ctx, expect=("chat",))
        tokenizer = models.load_tokenizer(options.model, options.trust_remote_code)
        model = models.load_model(options.model, options.trust_remote_code, **common.qlora_kwargs(options.lora))
        template = resolve_template(options.template, ctx.registry.chat_templates, tokenizer, base_dir=ctx.project_dir)
        models.prepare_tokenizer(model, tokenizer, template)
        common.record_template(ctx, template)
        train, evals = common.tokenize_split(
            ctx, ds.rows, "chat", tokenizer, template, options, train_on=options.train_on
        )
        training = factory.build_trainer(
            factory.SFT,
            ctx=ctx,
            opts=options,
            model=model,
            tokenizer=tokenizer,
            train_rows=train,
            eval_rows=evals,
            lora=options.lora,
        )
        outcome = loop.run_trainer(training, ctx)
        if outcome.stopped:
            return None  # stopped: the runner records it so and keeps the checkpoint
        common.save_outputs(ctx, training.trainer, tokenizer, template, options.lora, options.merge)
        outcome.record(ctx)
        return ctx.published
