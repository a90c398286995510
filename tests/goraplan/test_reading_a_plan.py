"""docs/reading-a-plan.md: its example runs as written on a real plan, with goraplan impossible to import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import goraplan
from tests.tiny import random_batches, tiny_llama

DOC = Path(__file__).resolve().parents[2] / "docs" / "reading-a-plan.md"

# Runs the example in a fresh interpreter where importing goraplan or gorafit fails, so the example
# cannot lean on the tool even indirectly.
RUNNER = """
import sys

class NoGoraplan:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("goraplan", "gorafit"):
            raise ImportError(f"{name} may not be imported by the example")

sys.meta_path.insert(0, NoGoraplan())
exec(compile(open(sys.argv[1]).read(), "reading-a-plan.md", "exec"))
assert not any(m.split(".")[0] in ("goraplan", "gorafit") for m in sys.modules)
"""


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/reading-a-plan.md has no python example"
    return blocks[0]


def run_example(folder: Path) -> subprocess.CompletedProcess:
    (folder / "example.py").write_text(example_code())
    return subprocess.run([sys.executable, "-c", RUNNER, "example.py"], cwd=folder, capture_output=True, text=True,
                          timeout=120)


def test_the_example_reads_a_real_plan_without_goraplan(tmp_path):
    plan = goraplan.build_plan(tiny_llama(), random_batches(2), goraplan.PlanSettings(steps=2, rank=4),
                               model_name="team-a/tiny", model_revision="c" * 40)
    plan.save(tmp_path / "plan.gora")
    result = run_example(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    man = plan.manifest
    assert lines[0] == f"base model team-a/tiny at revision {'c' * 40} (LlamaForCausalLM)"
    assert lines[1] == f"r0=4: {man.totals.allocated} of {man.totals.budget} parameters"
    assert len(lines) == 2 + len(man.modules)
    for line, module in zip(lines[2:], man.modules):
        update = module.scaling * (plan.lora_b(module.name) @ plan.lora_a(module.name))
        assert line.startswith(f"{module.name} rank {module.rank} share {module.share:.4f} ")
        printed = float(line.rsplit(" ", 1)[1])  # 4 significant digits; float32 sums may differ in the last
        assert abs(printed - update.norm().item()) <= 1e-3 * update.norm().item()


def test_the_example_catches_a_changed_tensor(tmp_path):
    plan = goraplan.build_plan(tiny_llama(), random_batches(2), goraplan.PlanSettings(steps=2, rank=4))
    path = plan.save(tmp_path / "plan.gora")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    result = run_example(tmp_path)
    assert result.returncode != 0 and "checksum mismatch" in result.stderr
