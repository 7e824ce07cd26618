"""DeepSpeed configuration for the `deepspeed` backend: the JSON generated from `[backend.deepspeed]`,
a user's own JSON file, and a check of either with DeepSpeed's own parser before anything is launched.

The generated config leaves every value the HF Trainer knows better ("auto": batch sizes, gradient
accumulation, clipping, learning rate, bucket sizes that depend on the model's hidden size) for the
Trainer to fill from its TrainingArguments, so a stage's options stay the single source of truth.

deepspeed is optional and slow to import (it probes for accelerators): it is imported only inside
`parse_deepspeed_config`, never when this module is loaded.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

KEY = "backend.deepspeed"
INSTALL_HINT = "pip install 'llmforge[deepspeed]'"
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
PRECISIONS = ("bf16", "fp16", "fp32", "auto")

# The defaults of [backend.deepspeed] (the shared contract); used when `ds` lacks an attribute, so a
# plain namespace with only the keys that matter works too.
DEFAULTS: dict[str, Any] = {
    "zero_stage": 2,
    "offload_optimizer": "none",
    "offload_params": "none",
    "nvme_path": "",
    "zero_quantized_weights": False,
    "zero_quantized_gradients": False,
    "zero_hpz_partition_size": 1,
}

# Stand-ins for the "auto" values the HF Trainer fills only once it has the model and its
# TrainingArguments (hf `HfTrainerDeepSpeedConfig.trainer_config_process/_finalize`). Before launch we
# know neither; any value of the right type and range meets the same checks in DeepSpeed's parser,
# so these are DeepSpeed's own defaults or the Trainer's.
_PLACEHOLDERS: dict[str, Any] = {
    "gradient_clipping": 1.0,
    "optimizer.params.lr": 1e-3,
    "optimizer.params.betas": [0.9, 0.999],
    "optimizer.params.eps": 1e-8,
    "optimizer.params.weight_decay": 0.0,
    "scheduler.params.warmup_min_lr": 0,
    "scheduler.params.warmup_max_lr": 1e-3,
    "scheduler.params.warmup_num_steps": 1,
    "scheduler.params.total_num_steps": 1,
    "fp16.enabled": False,
    "bf16.enabled": False,
    "zero_optimization.reduce_bucket_size": 500_000_000,
    "zero_optimization.stage3_prefetch_bucket_size": 50_000_000,
    "zero_optimization.stage3_param_persistence_threshold": 100_000,
}

# Sections DeepSpeed reads as objects; a scalar there crashes its parser with a bare TypeError.
_OBJECT_SECTIONS = (
    "zero_optimization",
    "fp16",
    "bf16",
    "optimizer",
    "scheduler",
    "activation_checkpointing",
    "aio",
    "comms_logger",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "hybrid_engine",
    "compile",
)

# DeepSpeed's pydantic models, by the name its validation errors carry, and the JSON key they parse.
_SECTION_OF_MODEL = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedBF16Config": "bf16",
    "CommsLoggerConfig": "comms_logger",
    "TensorBoardConfig": "tensorboard",
    "WandbConfig": "wandb",
    "CSVConfig": "csv_monitor",
    "CometConfig": "comet",
    "HybridEngineConfig": "hybrid_engine",
    "CompileConfig": "compile",
}


def _setting(ds: Any, name: str) -> Any:
    return getattr(ds, name, DEFAULTS[name]) if ds is not None else DEFAULTS[name]


def _offload(ds: Any, name: str, stage: int, nvme_path: str) -> dict | None:
    """The offload_optimizer / offload_param object for an offload setting, or None when it is off."""
    device = str(_setting(ds, name) or "none").lower()
    if device not in OFFLOAD_DEVICES:
        raise UsageError(f"{KEY}.{name}: must be one of {', '.join(OFFLOAD_DEVICES)} (got {device!r})")
    if device == "none":
        return None
    if name == "offload_params" and stage != 3:
        # Only ZeRO-3 partitions the parameters, so only it can page them out.
        raise UsageError(
            f"{KEY}.offload_params: parameter offload needs zero_stage = 3 (got {stage})",
            hint="set zero_stage = 3, or offload only the optimizer (offload_optimizer)",
        )
    if name == "offload_optimizer" and stage == 0:
        raise UsageError(
            f"{KEY}.offload_optimizer: optimizer offload needs ZeRO (zero_stage 1, 2 or 3; got 0)",
            hint="set zero_stage = 2 for optimizer offload without partitioned parameters",
        )
    if name == "offload_optimizer" and device == "nvme" and stage != 3:
        # Stages 1 and 2 accept the key but keep the states in CPU memory (their optimizer only knows
        # "offloaded or not"); only ZeRO-3 (ZeRO-Infinity) swaps them to NVMe.
        raise UsageError(
            f"{KEY}.offload_optimizer: NVMe offload needs zero_stage = 3 (got {stage}); "
            "stages 1 and 2 offload to CPU memory only",
            hint='use offload_optimizer = "cpu", or zero_stage = 3',
        )
    if device == "nvme":
        if not nvme_path:
            raise UsageError(
                f'{KEY}.nvme_path: {KEY}.{name} = "nvme" needs a folder on a fast local NVMe drive',
                hint=f'set {KEY}.nvme_path = "/local_nvme/deepspeed"',
            )
        return {"device": "nvme", "nvme_path": nvme_path}
    return {"device": "cpu"}


def _zero_plus_plus(ds: Any, stage: int) -> dict:
    """ZeRO++ keys (quantized weights qwZ, quantized gradients qgZ, hierarchical partitioning hpZ)."""
    out: dict[str, Any] = {}
    hpz = _setting(ds, "zero_hpz_partition_size")
    if not isinstance(hpz, int) or isinstance(hpz, bool) or hpz < 1:
        raise UsageError(f"{KEY}.zero_hpz_partition_size: must be an integer >= 1 (got {hpz!r})")
    for name in ("zero_quantized_weights", "zero_quantized_gradients"):
        if _setting(ds, name):
            out[name] = True
    if hpz > 1:
        out["zero_hpz_partition_size"] = hpz
    if out and stage != 3:
        # ZeRO++ changes how ZeRO-3 gathers partitioned weights and reduces gradients; stages 0-2 never
        # partition weights, and DeepSpeed would silently ignore the keys there.
        name = next(iter(out))
        raise UsageError(
            f"{KEY}.{name}: ZeRO++ options need zero_stage = 3 (got {stage})",
            hint="set zero_stage = 3, or turn the ZeRO++ options off",
        )
    return out


def _precision_sections(precision: str) -> dict:
    if precision not in PRECISIONS:
        raise UsageError(f"precision: must be one of {', '.join(PRECISIONS)} for DeepSpeed (got {precision!r})")
    if precision == "auto":
        # Not resolved yet: let the Trainer fill both from its bf16/fp16 arguments.
        return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    # Both sections are written, one on and one off, so that the stored JSON says which precision ran.
    # The HF Trainer checks them against its own bf16/fp16 arguments and refuses a mismatch.
    out: dict[str, dict[str, Any]] = {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "fp16":
        # fp16 overflows without loss scaling; 0 is DeepSpeed's dynamic scaler (written out to be plain).
        out["fp16"]["loss_scale"] = 0
    return out


def build_deepspeed_config(ds: Any, *, precision: str) -> dict:
    """The DeepSpeed JSON (as a dict) for a `[backend.deepspeed]` section.

    `ds` has the attribute names of `[backend.deepspeed]` (missing ones take their defaults);
    `precision` is "bf16", "fp16" or "fp32" ("auto" leaves it to the Trainer). Raises UsageError naming
    the `backend.deepspeed.*` key of a combination DeepSpeed does not support.
    """
    stage = _setting(ds, "zero_stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UsageError(f"{KEY}.zero_stage: must be 0, 1, 2 or 3 (got {stage!r})")
    nvme_path = str(_setting(ds, "nvme_path") or "")

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Reduce gradients while the backward pass still runs. DeepSpeed turns this on only for
        # stage 3; for 1 and 2 it costs a few reduce buckets of memory and hides most communication.
        zero["overlap_comm"] = True
        # Copy gradients into one buffer as they are produced: no fragmentation on long runs.
        zero["contiguous_gradients"] = True
        # The Trainer sets it to hidden_size² of the model: buckets that match the layers' sizes.
        zero["reduce_bucket_size"] = "auto"
    if stage == 3:
        # Also hidden-size based (0.9·h² and 10·h), filled by the Trainer from the model's config.
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
        # Without it, saving under ZeRO-3 writes only the sharded DeepSpeed checkpoint: the stage's
        # model artifact would be an empty shell that transformers cannot load.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    opt_offload = _offload(ds, "offload_optimizer", stage, nvme_path)
    if opt_offload:
        zero["offload_optimizer"] = opt_offload
    param_offload = _offload(ds, "offload_params", stage, nvme_path)
    if param_offload:
        zero["offload_param"] = param_offload
    zero.update(_zero_plus_plus(ds, stage))

    config: dict[str, Any] = {
        # All four come from the stage's options through the Trainer's arguments; fixed numbers here
        # would have to be kept equal to them by hand (the Trainer refuses a mismatch).
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        **_precision_sections(precision),
        "zero_optimization": zero,
    }
    if opt_offload:
        # With the optimizer offloaded, DeepSpeed refuses a client optimizer (the Trainer's torch AdamW)
        # because stepping it on CPU tensors is very slow; its own CPU AdamW (vectorised C++, built on
        # first use) takes over. The Trainer fills the hyper-parameters and keeps its own LR schedule.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def load_user_config(path: Path) -> dict:
    """A user's DeepSpeed JSON file as a dict; UsageError naming the file (and line/column) if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"{path}: DeepSpeed config file not found",
            hint=f"check {KEY}.config_file (relative paths are read from the project folder)",
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a DeepSpeed JSON file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def no_duplicates(pairs):
        # json keeps the last of two equal keys; DeepSpeed refuses them, and so do we, with the place.
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}",
            hint="DeepSpeed config files are plain JSON (no comments, no trailing commas)",
        ) from None
    except _Duplicate as exc:
        raise UsageError(f"{path}: key {exc.key!r} appears twice in one object") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a DeepSpeed config must be a JSON object ({{...}}), not {_json_type(data)}")
    return data


class _Duplicate(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# -- validation with DeepSpeed's parser ---------------------------------------------------------------


def _node(config: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict holding the last part of a dotted key, and that part (None when a parent is missing)."""
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def _fill(config: dict, dotted: str, value: Any, where: str, *, must_match: bool = False) -> None:
    """Replace an "auto" value like the HF Trainer does; with must_match, a fixed value that differs from
    what the Trainer will use is an error here, as it would be at the start of training."""
    node, leaf = _node(config, dotted)
    if node is None or leaf not in node:
        return
    if node[leaf] == "auto":
        node[leaf] = value
    elif must_match and node[leaf] != value:
        raise UsageError(
            f"{where}{dotted}: {node[leaf]!r} differs from {value!r} (the stage's batch settings "
            "and the number of processes); the HF Trainer refuses a mismatch",
            hint=f'set "{dotted}": "auto" so that the Trainer fills it',
        )


def _where(source: Any) -> str:
    return f"{source}: " if source else "DeepSpeed config: "


def _key_of_validation_error(config: dict, title: str, loc: tuple) -> str:
    """The dotted JSON key of a pydantic error from one of DeepSpeed's config models."""
    inner = ".".join(str(p) for p in loc)
    section = _SECTION_OF_MODEL.get(title)
    if section is None:
        # An unknown model: the top-level section whose object holds this location.
        holders = [k for k, v in config.items() if isinstance(v, dict) and loc and str(loc[0]) in v]
        section = holders[0] if len(holders) == 1 else None
    return f"{section}.{inner}" if section and inner else (section or inner)


def _key_in_message(config: dict, message: str) -> str | None:
    """The config key an assertion message of DeepSpeed's is about (they name keys, not paths): among the
    keys whose name appears in it, the one with most of its path named too."""

    def named(word: str) -> bool:
        return re.search(rf"\b{re.escape(word)}\b", message) is not None

    found: list[tuple[int, int, str]] = []

    def walk(node: dict, parts: list[str]) -> None:
        for key, value in node.items():
            path = parts + [str(key)]
            if named(str(key)):
                found.append((sum(map(named, path)), len(path), ".".join(path)))
            if isinstance(value, dict):
                walk(value, path)

    walk(config, [])
    return max(found)[2] if found else None


def parse_deepspeed_config(
    config: dict, *, micro_batch: int, grad_accum: int, world_size: int, source: str | os.PathLike | None = None
) -> Any:
    """Fill a copy of `config` as the HF Trainer would for this batch layout and parse it with
    `deepspeed.runtime.config.DeepSpeedConfig`; return the parsed object.

    `source` (a file name) prefixes the messages. UsageError names the offending key on rejection, and
    gives the install hint when deepspeed is missing.
    """
    where = _where(source)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as exc:
        raise UsageError(
            f"the deepspeed backend needs DeepSpeed, which is not installed ({exc})", hint=INSTALL_HINT
        ) from None
    import pydantic

    if not isinstance(config, dict):
        raise UsageError(f"{where}a DeepSpeed config must be a JSON object, not {_json_type(config)}")
    filled = copy.deepcopy(config)
    for section in _OBJECT_SECTIONS:
        if (
            section in filled
            and not isinstance(filled[section], dict)
            and not (section == "zero_optimization" and isinstance(filled[section], bool))
        ):
            raise UsageError(f"{where}{section}: must be a JSON object, not {_json_type(filled[section])}")

    if "train_micro_batch_size_per_gpu" not in filled and "train_batch_size" not in filled:
        # The Trainer and accelerate fill only keys that are present; DeepSpeed then stops at start-up.
        raise UsageError(
            f"{where}train_micro_batch_size_per_gpu: missing (DeepSpeed needs it or train_batch_size)",
            hint='add "train_micro_batch_size_per_gpu": "auto", '
            '"gradient_accumulation_steps": "auto", "train_batch_size": "auto"',
        )
    # The batch layout of the launch, filled or checked exactly as the Trainer does
    # (train_batch_size = world size × micro-batch × accumulation).
    _fill(filled, "train_micro_batch_size_per_gpu", micro_batch, where, must_match=True)
    _fill(filled, "gradient_accumulation_steps", grad_accum, where, must_match=True)
    _fill(filled, "train_batch_size", micro_batch * grad_accum * world_size, where, must_match=True)
    for dotted, value in _PLACEHOLDERS.items():
        _fill(filled, dotted, value, where)

    zero = filled.get("zero_optimization")
    hpz = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, dict) else 1
    if isinstance(hpz, int) and not isinstance(hpz, bool) and hpz > 1 and world_size % min(hpz, world_size):
        # DeepSpeed splits the ranks into groups of this size at start-up and stops if they don't divide.
        raise UsageError(
            f"{where}zero_optimization.zero_hpz_partition_size: {hpz} does not divide the "
            f"{world_size} processes of this launch",
            hint="use the number of GPUs per node (hpZ keeps a weight copy inside each node)",
        )

    class AtWorldSize(DeepSpeedConfig):
        # DeepSpeedConfig asks torch.distributed for the world size and silently uses 1 when no process
        # group exists, as before launch; its batch-size check must see the launch's processes.
        def _initialize_params(self, param_dict):
            self.world_size = world_size
            super()._initialize_params(param_dict)

    try:
        return AtWorldSize(filled)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = _key_of_validation_error(filled, exc.title, tuple(err.get("loc", ())))
        message = err.get("msg", str(exc))
        if key == "zero_optimization.stage":
            message = "must be 0, 1, 2 or 3"  # DeepSpeed's enum lists its alias max_stage: "0, 1, 2, 3 or 3"
        value = err.get("input")
        # Field errors carry the offending value; a whole-section check carries the section (too long).
        got = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) else ""
        raise UsageError(
            f"{where}{key}: {message}{got}",
            hint="DeepSpeed's config reference: https://www.deepspeed.ai/docs/config-json/",
        ) from None
    except (AssertionError, ValueError, TypeError, KeyError) as exc:
        message = str(exc) or type(exc).__name__
        named = _key_in_message(filled, message)
        raise UsageError(f"{where}{named + ': ' if named else ''}DeepSpeed rejects the config: {message}") from None


def validate_deepspeed_config(
    config: dict, *, micro_batch: int, grad_accum: int, world_size: int, source: str | os.PathLike | None = None
) -> None:
    """Check a DeepSpeed config for a launch of `world_size` processes with DeepSpeed's own parser
    (see `parse_deepspeed_config`); raises UsageError naming the key DeepSpeed rejects."""
    parse_deepspeed_config(config, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size, source=source)
