"""gorafit: GoRA stage two. Train the adapter a `.gora` plan describes, then export it.

Two lines add GoRA to your own training loop (TRL, a plain Trainer, anything):

>>> from gorafit import apply_plan
>>> model = apply_plan(model, goraplan.load_plan("plan.gora"))   # doctest: +SKIP

Or let gorafit run the whole recipe (HF Trainer, LoRA+ learning rates, DDP / FSDP / DeepSpeed):

>>> from gorafit import TrainSettings, train
>>> result = train("plan.gora", TrainSettings(max_steps=200))    # doctest: +SKIP
>>> result.adapter_dir                                          # doctest: +SKIP
PosixPath('runs/plan/adapter')
"""

# Imported eagerly: the function `train` shares its name with the module `gorafit.train`, and only an
# eager import keeps `from gorafit import train` the function once that module has been imported.
from gorafit.apply import apply_plan
from gorafit.settings import TrainSettings
from gorafit.train import GoraTrainer, RunResult, train

__all__ = ["GoraTrainer", "RunResult", "TrainSettings", "apply_plan", "train"]
