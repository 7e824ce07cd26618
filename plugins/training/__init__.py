"""Shared machinery of the training stages (pretrain, continued_pretrain, sft, dpo).

`options` is light (pydantic only) and is imported by the stage modules at start-up; everything else
here imports torch/transformers/TRL and is imported only inside a stage's run().
"""
