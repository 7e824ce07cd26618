"""`reward_model`: a reward model trained on preference rows with TRL's RewardTrainer, and `RewardScorer`,
which scores conversations with one.

A reward model is the model input with its language-model head replaced by a one-output score head
(AutoModelForSequenceClassification, num_labels = 1), trained so that the chosen answer of each pair scores
above the rejected one (Bradley-Terry loss). The stage writes a `reward_model` artifact: a complete HF folder
(weights, config, tokenizer with the chat template it was trained with) plus `reward.json` (base model,
template, the score statistics on the eval split). With LoRA the adapter is merged into it, so that scoring
needs no PEFT.

One formatting for training and scoring (`encode`): the prompt's messages and the assistant answer rendered by
the chat template, the end kept when it is longer than max_length (the answer is what is judged). The stage
tokenizes the pairs itself and hands TRL the token ids, so RewardScorer reads exactly what training read.

Checkpoints, stop and resume are the other training stages': factory.build_trainer and loop.run_trainer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext
from llmforge_plugins.training.options import LoraOptions, TemplateChecks, TrainOptions

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv, Shape

#: The artifact's own record, beside the HF files.
REWARD_JSON = "reward.json"


class RewardModelOptions(TrainOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(
        description="The model to start from: HF dir or @stage (its LM head is replaced by a score head)."
    )
    data: DataOptions = Field(description="Preference data (prompt / chosen / rejected).")
    template: str | None = Field(None, description="Chat template (default: the model's own).")
    lora: LoraOptions = Field(
        default_factory=LoraOptions,
        description="LoRA settings (the score head is trained in full beside the adapter; the result is merged).",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    max_length: int = Field(
        512, gt=8, description="Longest conversation in tokens; a longer one keeps its last max_length (the answer)."
    )
    center_rewards: float = Field(
        0.0, ge=0, description="Weight of a penalty on the mean score, keeping scores centred on 0 (0 = off)."
    )
    eval_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of pairs held out: the reward accuracy and margin are measured on them."
    )
    packing: bool = Field(False, description="Not used (pairs are batched as pairs).")


class RewardModelStage(TemplateChecks, Stage):
    kind = "reward_model"
    summary = "A reward model (sequence classification) trained on preference rows with TRL's reward trainer."
    Options = RewardModelOptions
    produces = ("reward_model",)
    cache_libraries = ("torch", "transformers", "trl", "peft")

    def estimate(self, options: RewardModelOptions, env: PlanEnv) -> Estimate:
        from llmforge_plugins.training.estimate import training_estimate

        # Chosen and rejected go through the model together, like DPO's pairs, but with no reference model.
        return training_estimate(options, env, env.shape_of("model"), pairs=True, reference=False)

    def output_shape(self, options: RewardModelOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.training.estimate import trained_shape

        return trained_shape(options, env.shape_of("model"))

    def run(self, options: RewardModelOptions, ctx: StageContext) -> Produced | None:
        from llmforge.chat import resolve_template
        from llmforge_plugins.training import common, factory, loop, models
        from llmforge_plugins.training.tokenized import split_eval

        common.check_qlora(options.lora)
        seed = common.seed_of(options, ctx)
        models.set_seed(seed)  # the score head is initialised at random: seeded
        ds = common.load_rows(options.data, ctx, expect=("preference",))
        tokenizer = models.load_tokenizer(options.model, options.trust_remote_code)
        model = load_classifier(options.model, options.trust_remote_code, **common.qlora_kwargs(options.lora))
        template = resolve_template(options.template, ctx.registry.chat_templates, tokenizer, base_dir=ctx.project_dir)
        # A template without a pad gets one (never EOS), and the model's config learns it: a sequence
        # classifier reads the score at the last token that is not padding.
        models.prepare_tokenizer(model, tokenizer, template)
        common.record_template(ctx, template)

        train_rows, eval_rows = split_eval(ds.rows, options.eval_split, seed)
        train_pairs, cut = encode_pairs(tokenizer, train_rows, options.max_length)
        eval_pairs, cut_eval = encode_pairs(tokenizer, eval_rows, options.max_length)
        ctx.log(
            f"reward pairs: {len(train_pairs)} to train, {len(eval_pairs)} held out; "
            f"{cut + cut_eval} sequence(s) cut to their last {options.max_length} tokens"
        )
        if not eval_pairs:
            ctx.log("no held-out pairs (eval_split = 0 or too few rows): no reward accuracy is measured", "warning")
        training = factory.build_trainer(
            factory.REWARD,
            ctx=ctx,
            opts=options,
            model=model,
            tokenizer=tokenizer,
            train_rows=train_pairs,
            eval_rows=eval_pairs or None,
            lora=options.lora,
        )
        outcome = loop.run_trainer(training, ctx)
        if outcome.stopped:
            return None  # stopped: the runner records it so and keeps the checkpoint
        outcome.record(ctx)
        trained = training.trainer.model
        if options.lora.enabled:
            trained = trained.merge_and_unload()  # a plain classifier: scoring needs no PEFT
        stats = None
        if eval_pairs:
            stats = pair_statistics(trained, eval_pairs, tokenizer.pad_token_id, options.micro_batch_size)
            ctx.info["reward_accuracy"], ctx.info["reward_margin"] = stats["accuracy"], stats["margin"]
            ctx.metric(outcome.steps, reward_accuracy=stats["accuracy"], reward_margin=stats["margin"])
            ctx.log(
                f"held-out pairs: chosen above rejected in {100 * stats['accuracy']:.1f}% "
                f"(mean margin {stats['margin']:.3f})"
            )
        record = {
            "version": 1,
            "base_model": str(options.model),
            "template": {"name": template.name, "hash": template.hash, "eos": template.eos},
            "max_length": options.max_length,
            "lora": options.lora.enabled,
            "pairs": {"train": len(train_pairs), "eval": len(eval_pairs)},
            "eval": stats,
        }
        with ctx.artifact("reward_model") as out:
            models.save_model_dir(trained, tokenizer, out, template)
            (out / REWARD_JSON).write_text(json.dumps(record, indent=2) + "\n")
        return ctx.published


def load_classifier(path: str | Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """A one-output sequence classifier on the model at `path` (an HF folder, or an adapter folder whose
    base it is merged into); its score head is new, initialised from the current RNG state."""
    from transformers import AutoModelForSequenceClassification

    from llmforge.errors import DataError
    from llmforge_plugins.training import models

    path = Path(path)
    if models.is_adapter(path):
        lm = models.load_model(path, trust_remote_code)  # the base with the adapter merged
        config = copy.deepcopy(lm.config)
        config.num_labels = 1
        clf = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
        body = getattr(clf, clf.base_model_prefix)
        body.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
        return clf.to(lm.dtype)
    if not (path / "config.json").exists():
        raise DataError(f"{path}: not a model directory (no config.json)")
    from llmforge.chatter import cover_late_handlers

    cover_late_handlers()  # loading chatter goes to the run's debug events (see llmforge/chatter.py)
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # TRL's scope in which a new score head and an unused LM head are expected, not reported as problems.
    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, trust_remote_code=trust_remote_code, **kwargs
        )


def encode(tokenizer: Any, messages: Sequence[dict], max_length: int | None) -> tuple[list[int], bool]:
    """One conversation's token ids as the chat template renders it, and whether it was cut: a longer one
    keeps its last `max_length` tokens (the answer, which is what is scored, is at the end)."""
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True)["input_ids"]
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


def encode_pairs(tokenizer: Any, rows: Sequence[dict], max_length: int) -> tuple[list[dict], int]:
    """Preference rows as TRL's tokenized pairs ({chosen_ids, rejected_ids}), and how many sequences were cut."""
    pairs, cut = [], 0
    for row in rows:
        prompt = list(row.get("prompt") or [])
        chosen, c1 = encode(tokenizer, prompt + list(row["chosen"]), max_length)
        rejected, c2 = encode(tokenizer, prompt + list(row["rejected"]), max_length)
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected})
        cut += int(c1) + int(c2)
    return pairs, cut


def score_ids(model: Any, sequences: Sequence[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """The model's score for each token sequence, in order; batched (sequences of similar length together),
    right-padded with `pad_id` (the classifier reads the last token that is not padding), without gradients."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores: list[float] = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(idx):
                    scores[i] = float(logits[row, 0].float())
    finally:
        model.train(was_training)
    return scores


def _summary(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / n) ** 0.5
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def pair_statistics(model: Any, pairs: Sequence[dict], pad_id: int, batch_size: int = 8) -> dict[str, Any]:
    """How the model scores tokenized pairs: the share where chosen scores above rejected (accuracy), the
    mean margin (chosen - rejected), and the scores of each side."""
    chosen = score_ids(model, [p["chosen_ids"] for p in pairs], pad_id, batch_size)
    rejected = score_ids(model, [p["rejected_ids"] for p in pairs], pad_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairs": len(pairs),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "chosen": _summary(chosen),
        "rejected": _summary(rejected),
        "scores": _summary(chosen + rejected),
    }


class RewardScorer:
    """Scores answers with a `reward_model` artifact: one scalar per (prompt, answer), higher is better.

    `score(prompts, answers)`: each prompt a list of messages ending with a user turn (or a string, one user
    turn), each answer the assistant's text; the conversation is formatted by the folder's chat template as
    in training. `max_length` defaults to the one the model was trained with (reward.json)."""

    def __init__(
        self, path: str | Path, *, batch_size: int = 8, max_length: int | None = None, device: str | None = None
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from llmforge.errors import DataError

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise DataError(f"{self.path}: not a reward model folder (no config.json)")
        meta_path = self.path / REWARD_JSON
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.batch_size = batch_size
        self.max_length = max_length if max_length is not None else self.meta.get("max_length")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{self.path}: the tokenizer has no chat template to format conversations with")
        self.model = AutoModelForSequenceClassification.from_pretrained(str(self.path))
        if self.model.config.num_labels != 1:
            raise DataError(
                f"{self.path}: not a reward model (a classifier with {self.model.config.num_labels} outputs, not 1)"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.pad_token_id

    def score(self, prompts: Sequence[Sequence[dict] | str], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        seqs = []
        for prompt, answer in zip(prompts, answers, strict=True):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            seqs.append(
                encode(self.tokenizer, [*messages, {"role": "assistant", "content": answer}], self.max_length)[0]
            )
        return score_ids(self.model, seqs, self.pad_id, self.batch_size)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
