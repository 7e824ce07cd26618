"""`continued_pretrain`: more causal-LM training of an existing model on new text, optionally mixing
replay data (general text like the original corpus) to limit forgetting, and measuring forgetting:
perplexity on held-out general text before and after training.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext
from llmforge_plugins.training.options import LoraOptions, TrainOptions, adapter_outputs

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv, Shape


class ContinuedPretrainOptions(TrainOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(description="The model to continue: HF dir or @stage.")
    data: DataOptions = Field(description="New-domain text.")
    replay: DataOptions | None = Field(None, description="General text mixed back in against forgetting.")
    replay_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of training sequences taken from replay.")
    heldout: DataOptions | None = Field(
        None, description="General text for the forgetting report (default: a held-out slice of replay)."
    )
    heldout_rows: int = Field(64, ge=1, description="Rows of held-out text used for perplexity.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA settings.")
    merge: bool = Field(True, description="With LoRA: also write the merged model.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")


class ContinuedPretrainStage(Stage):
    kind = "continued_pretrain"
    summary = "Continue pretraining on new text with optional replay; reports forgetting (perplexity)."
    Options = ContinuedPretrainOptions
    produces = ("model", "adapter", "report")
    cache_libraries = ("torch", "transformers", "trl", "peft")

    def outputs(self, options) -> tuple[str, ...]:
        return adapter_outputs(options, "report")

    def estimate(self, options: ContinuedPretrainOptions, env: PlanEnv) -> Estimate:
        # Planning: the model input's shape (through @references), trained with these options.
        from llmforge_plugins.training.estimate import training_estimate

        return training_estimate(options, env, env.shape_of("model"))

    def output_shape(self, options: ContinuedPretrainOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.training.estimate import trained_shape

        return trained_shape(options, env.shape_of("model"))

    def run(self, options: ContinuedPretrainOptions, ctx: StageContext) -> Produced | None:
        from llmforge_plugins.training import common, evaluation, factory, loop, models, tokenized

        seed = common.seed_of(options, ctx)
        models.set_seed(seed)
        new = common.load_rows(options.data, ctx, expect=("text",)).rows
        replay = common.load_rows(options.replay, ctx, expect=("text",), name="replay").rows if options.replay else []
        rng = random.Random(seed)
        if options.heldout is not None:
            heldout = common.load_rows(options.heldout, ctx, expect=("text",), name="heldout").rows[
                : options.heldout_rows
            ]
        elif replay:
            # Hold out part of the replay text (at most a fifth) so the forgetting check never trains on it.
            rng.shuffle(replay)
            cut = min(options.heldout_rows, len(replay) // 5 or 1)
            heldout, replay = replay[:cut], replay[cut:]
        else:
            heldout = []
            ctx.log("no replay or heldout data: the forgetting report is skipped", level="warning")

        common.check_qlora(options.lora)
        tokenizer = models.load_tokenizer(options.model, options.trust_remote_code)
        model = models.load_model(options.model, options.trust_remote_code, **common.qlora_kwargs(options.lora))
        new_tok = tokenized.tokenize(
            new, "text", tokenizer, None, max_length=options.max_length, cache_dir=common.cache_dir(ctx)
        ).rows
        mixed = list(new_tok)
        if replay and options.replay_ratio > 0:
            rep_tok = tokenized.tokenize(
                replay, "text", tokenizer, None, max_length=options.max_length, cache_dir=common.cache_dir(ctx)
            ).rows
            # replay_ratio of the final mix comes from replay: n_rep / (n_new + n_rep) = ratio
            want = int(round(len(new_tok) * options.replay_ratio / (1 - options.replay_ratio)))
            picks = [rep_tok[i % len(rep_tok)] for i in range(want)] if rep_tok else []
            mixed += picks
            ctx.log(f"mix: {len(new_tok)} new + {len(picks)} replay sequences (ratio {options.replay_ratio:g})")
        rng.shuffle(mixed)
        held_tok = (
            tokenized.tokenize(heldout, "text", tokenizer, None, max_length=options.max_length).rows if heldout else []
        )

        before = evaluation.perplexity(model, held_tok) if held_tok else None
        if before is not None:
            ctx.metric(step=0, heldout_ppl=before)
        train, evals = tokenized.split_eval(mixed, options.eval_split, seed)
        training = factory.build_trainer(
            factory.SFT,
            ctx=ctx,
            opts=options,
            model=model,
            tokenizer=tokenizer,
            train_rows=train,
            eval_rows=evals or None,
            lora=options.lora,
        )
        outcome = loop.run_trainer(training, ctx)
        if outcome.stopped:
            return None  # stopped: the runner records it so and keeps the checkpoint
        after = evaluation.perplexity(training.trainer.model, held_tok) if held_tok else None
        change = (after - before) / before if before and after else None
        report = {
            "heldout_rows": len(held_tok),
            "ppl_before": before,
            "ppl_after": after,
            "relative_change": change,
            "new_sequences": len(new_tok),
            "replay_ratio": options.replay_ratio,
            "final_loss": outcome.final_loss,
        }
        # change is None only without held-out rows, and then after is None too (a perplexity is never 0)
        if after is not None and change is not None:
            ctx.metric(step=outcome.steps, heldout_ppl=after, forgetting=change)
            ctx.log(f"forgetting: held-out perplexity {before:.3f} -> {after:.3f} ({100 * change:+.1f}%)")
        outcome.record(ctx)
        ctx.info.update({k: v for k, v in report.items() if isinstance(v, (int, float)) or v is None})
        with ctx.artifact("report") as out:
            (out / "forgetting.json").write_text(json.dumps(report, indent=2))
        common.save_outputs(ctx, training.trainer, tokenizer, None, options.lora, options.merge)
        return ctx.published
