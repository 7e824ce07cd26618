"""`dpo`: Direct Preference Optimisation with TRL's DPOTrainer on preference pairs.

Full or LoRA. With LoRA the reference model is the base with the adapter switched off (TRL does
this when it gets a PEFT config and no ref_model), not a second copy in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext
from llmforge_plugins.training.options import LoraOptions, TemplateChecks, TrainOptions, adapter_outputs

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv, Shape


class DpoOptions(TrainOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(description="The model to align: HF dir or @stage.")
    data: DataOptions = Field(description="Preference data (prompt / chosen / rejected).")
    template: str | None = Field(None, description="Chat template (default: the model's own).")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "apo_zero", "apo_down"] = Field(
        "sigmoid", description="DPO loss variant (sigmoid is the original)."
    )
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA settings.")
    merge: bool = Field(False, description="With LoRA: also write the merged model.")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (DPO wants it small).")
    packing: bool = Field(False, description="Not used by DPO (pairs are batched as pairs).")


class DpoStage(TemplateChecks, Stage):
    kind = "dpo"
    summary = "Preference tuning with DPO (TRL); full or LoRA with the base as implicit reference."
    Options = DpoOptions
    produces = ("model", "adapter")
    cache_libraries = ("torch", "transformers", "trl", "peft")

    def outputs(self, options) -> tuple[str, ...]:
        return adapter_outputs(options)

    def estimate(self, options: DpoOptions, env: PlanEnv) -> Estimate:
        # Planning: the model input's shape (through @references), trained with these options on chosen/rejected pairs.
        from llmforge_plugins.training.estimate import training_estimate

        return training_estimate(options, env, env.shape_of("model"), pairs=True)

    def output_shape(self, options: DpoOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.training.estimate import trained_shape

        return trained_shape(options, env.shape_of("model"))

    def run(self, options: DpoOptions, ctx: StageContext) -> Produced | None:
        from llmforge.chat import resolve_template
        from llmforge_plugins.training import common, factory, loop, models

        common.check_qlora(options.lora)
        seed = common.seed_of(options, ctx)
        models.set_seed(seed)
        ds = common.load_rows(options.data, ctx, expect=("preference",))
        tokenizer = models.load_tokenizer(options.model, options.trust_remote_code)
        model = models.load_model(options.model, options.trust_remote_code, **common.qlora_kwargs(options.lora))
        template = resolve_template(options.template, ctx.registry.chat_templates, tokenizer, base_dir=ctx.project_dir)
        models.prepare_tokenizer(model, tokenizer, template)
        common.record_template(ctx, template)

        from llmforge_plugins.training.tokenized import split_eval

        # Preference rows go to DPOTrainer as they are (prompt, chosen, rejected): TRL tokenizes the pairs.
        train_rows, eval_rows = split_eval(ds.rows, options.eval_split, seed)
        training = factory.build_trainer(
            factory.DPO,
            ctx=ctx,
            opts=options,
            model=model,
            tokenizer=tokenizer,
            train_rows=train_rows,
            eval_rows=eval_rows,
            lora=options.lora,
        )
        trainer = training.trainer
        outcome = loop.run_trainer(training, ctx)
        if outcome.stopped:
            return None  # stopped: the runner records it so and keeps the checkpoint
        margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
        outcome.record(ctx)
        if margins:
            ctx.info["reward_margin_first"], ctx.info["reward_margin_last"] = margins[0], margins[-1]
        common.save_outputs(ctx, trainer, tokenizer, template, options.lora, options.merge)
        return ctx.published
