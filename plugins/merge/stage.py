"""`merge`: the merge as a pipeline stage. Inputs are models (`@sft`, `@dpo`, paths) or LoRA adapters
(merged into their base as they are read); it writes one `model` artifact, a complete HF directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmforge.stage import Produced, Stage, StageContext
from llmforge_plugins.merge.options import MergeOptions

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.planning import Estimate, PlanEnv, Shape
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact


class MergeStage(Stage):
    """Merges models tensor by tensor from their safetensors files (see docs/merge.md): weighted averages,
    SLERP, task arithmetic, TIES, DARE, Model Stock, and layer stacking with slices. Parameters may be a
    number, a list interpolated across layers, or values per tensor-name filter."""

    kind = "merge"
    summary = "Merge models: linear, slerp, task arithmetic, TIES, DARE, model stock, passthrough slices."
    Options = MergeOptions
    produces = ("model",)
    version = "1"
    cache_libraries = ("torch", "safetensors")

    def check(
        self, options: MergeOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        if registry is None:
            return []  # no methods table to check against (validate and the runner always pass one)
        from llmforge_plugins.merge.api import MERGE_METHODS
        from llmforge_plugins.merge.plan import static_problems

        return static_problems(options, registry.table(MERGE_METHODS))

    def estimate(self, options: MergeOptions, env: PlanEnv) -> Estimate:
        # Planning: arithmetic on the input model's shape (the base, else the first model or slice source).
        from llmforge_plugins.merge.estimate import SHAPE_FIELDS, estimate_merge

        return estimate_merge(options, env.shape_of(*SHAPE_FIELDS))

    def output_shape(self, options: MergeOptions, env: PlanEnv) -> Shape:
        from llmforge_plugins.merge.estimate import SHAPE_FIELDS, merged_shape

        return merged_shape(options, env.shape_of(*SHAPE_FIELDS))

    def run(self, options: MergeOptions, ctx: StageContext) -> Produced | None:
        from llmforge_plugins.merge.api import MERGE_METHODS
        from llmforge_plugins.merge.engine import Reporter, execute
        from llmforge_plugins.merge.plan import prepare

        plan = prepare(options, ctx.registry.table(MERGE_METHODS), out=ctx.stage_dir, seed=ctx.seed)
        report = Reporter(log=ctx.log, progress=ctx.progress, should_stop=ctx.should_stop)
        with ctx.artifact("model") as out:
            summary = execute(plan, out, report)
            if summary is None:  # stopped: the artifact block discards the partial folder
                ctx.log("merge stopped before it finished; nothing was written")
                return None
        ctx.info.update(summary)
        return ctx.published
