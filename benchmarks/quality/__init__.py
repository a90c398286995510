"""Quality benchmark: GoRA against LoRA and its variants at the same budget (see run.py)."""
