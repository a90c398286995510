"""Every setting a plan is built with, validated up front and recorded in the plan's manifest."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from goraplan.allocate import SERVING_RANKS, AllocationMode
from goraplan.errors import GoraError
from goraplan.importance import ImportanceMetric
from goraplan.step_size import STEP_SIZE_CANDIDATES

Task = Literal["causal-lm", "seq-cls"]
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "causal-lm": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "seq-cls": "all-linear",
}


class PlanSettings(BaseModel):
    """Settings of `goraplan build` (GoRA stage 1). Unknown keys are errors.

    >>> PlanSettings(rank=8).resolved().max_rank
    16
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task = Field("causal-lm", description="causal-lm (next-token loss) or seq-cls (classification).")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt (PEFT's suffix matching) or 'all-linear'; "
        "default q/k/v/o projections for causal-lm, all-linear for seq-cls.",
    )
    rank: int = Field(8, ge=1, description="r0: plain LoRA's rank; the budget is r0 * sum(out + in).")
    min_rank: int | None = Field(None, ge=1, description="Smallest rank a module gets; default max(1, r0 // 2).")
    max_rank: int | None = Field(None, ge=1, description="Largest rank a module gets; default 2 * r0 (the "
                                    "paper's 4 * r0 measured no better and serves slower, docs/method.md §8).")
    serve_rank: int | None = Field(
        None,
        description="The vLLM --max-lora-rank the adapter will be served at (one of "
        f"{', '.join(map(str, SERVING_RANKS))}); vLLM pads every module to it, so max rank defaults to "
        "min(2 * r0, serve rank) and may not exceed it.",
    )
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scaling is rsLoRA's alpha / sqrt(r_i).")
    step_size: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        0.05,
        description="gamma: the initial adapter is about -gamma * G; 'auto' picks it from "
        f"{list(STEP_SIZE_CANDIDATES)} by the loss on held_out_steps batches after the N gradient batches.",
    )
    held_out_steps: int = Field(4, ge=1, description="K: held-out batches for step_size 'auto' (unused otherwise).")
    steps: int = Field(64, ge=1, description="N: gradient steps (batches) to accumulate.")
    batch_size: int = Field(4, ge=1, description="Examples per gradient step.")
    max_length: int = Field(256, ge=8, description="Tokens per example at most.")
    importance: ImportanceMetric = Field("sensitivity", description="Layer importance metric (eq. 8 / Table 5).")
    allocation: AllocationMode = Field("exact", description="exact: fill the budget; paper: eq. 10 as written.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds data order and the random A matrices (0 .. 2**32 - 1).")
    a_init: Literal["kaiming-uniform"] = Field("kaiming-uniform", description="Init of A (PEFT's default).")
    offload_gradients: bool = Field(False, description="Keep the float32 accumulators in CPU memory.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")

    @model_validator(mode="after")
    def _ranks_in_order(self) -> PlanSettings:
        if self.serve_rank is not None:
            self._check_serve_rank(self.serve_rank)
        r = self.resolved_rank_bounds()
        if r[0] > r[1]:
            raise ValueError(f"min rank {r[0]} is larger than max rank {r[1]}")
        if not r[0] <= self.rank <= r[1]:
            raise ValueError(f"rank {self.rank} must lie between min rank {r[0]} and max rank {r[1]}")
        return self

    @property
    def batches_needed(self) -> int:
        """Batches of data a build reads: N gradient steps, plus K held-out ones for step_size 'auto'."""
        return self.steps + (self.held_out_steps if self.step_size == "auto" else 0)

    def _check_serve_rank(self, serve_rank: int) -> None:
        if serve_rank not in SERVING_RANKS:
            raise ValueError(f"serve rank {serve_rank} is not a value of vLLM's --max-lora-rank: use one of "
                             f"{', '.join(map(str, SERVING_RANKS))}")
        if self.rank > serve_rank:
            raise ValueError(f"rank {self.rank} (r0) is above serve rank {serve_rank}: lower --rank or raise "
                             f"--serve-rank")
        if self.max_rank is not None and self.max_rank > serve_rank:
            raise ValueError(f"max rank {self.max_rank} is above serve rank {serve_rank}, and vLLM refuses an adapter "
                             f"whose rank exceeds --max-lora-rank: lower --max-rank or raise --serve-rank")

    def resolved_rank_bounds(self) -> tuple[int, int]:
        r_min = self.min_rank if self.min_rank is not None else max(1, self.rank // 2)
        r_max = self.max_rank if self.max_rank is not None else 2 * self.rank
        if self.max_rank is None and self.serve_rank is not None:
            r_max = min(r_max, self.serve_rank)
        return r_min, r_max

    def resolved(self) -> PlanSettings:
        """The same settings with every default filled in, as recorded in a plan."""
        r_min, r_max = self.resolved_rank_bounds()
        targets = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS[self.task]
        return self.model_copy(update={"min_rank": r_min, "max_rank": r_max, "target_modules": targets})


def make_settings(**values) -> PlanSettings:
    """Build settings, turning validation failures into one `GoraError` sentence that lists every problem."""
    try:
        return PlanSettings(**values)
    except ValidationError as exc:
        raise GoraError("invalid settings: " + validation_summary(exc)) from None


def validation_summary(exc: ValidationError) -> str:
    """All of a pydantic error's problems in one line: ``field: message; field: message``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
