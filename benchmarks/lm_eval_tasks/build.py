"""Writes the two tiny evaluation sets of the lm-eval tasks in this folder from the demo model's held-out text
(Python files the demo model never trained on): `next_line.jsonl`, which of four lines comes next (one is the real
next line, three are lines from elsewhere in the text), and `complete_line.jsonl`, the last word of a line given
everything before it. Deterministic: `python benchmarks/lm_eval_tasks/build.py` rewrites the same files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT = HERE.parent.parent / "offload_core" / "demo" / "model" / "heldout.txt"
CONTEXT_LINES = 6  # lines of code before the one asked about
SEED = 23


def _candidates(lines: list[str]) -> list[int]:
    """Lines worth asking about: code (no blank, comment or docstring-looking line) after a full context."""
    return [i for i, line in enumerate(lines) if i >= CONTEXT_LINES and len(line.strip()) >= 10
            and not line.strip().startswith(("#", '"', "'")) and " " in line.strip()]


def _context(lines: list[str], i: int) -> str:
    return "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"


def build(count_mc: int = 20, count_gen: int = 16) -> dict[str, list[dict]]:
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    pool = _candidates(lines)
    rng = random.Random(SEED)
    picked = rng.sample(pool, count_mc + count_gen)
    mc, gen = sorted(picked[:count_mc]), sorted(picked[count_mc:])
    next_line = []
    for i in mc:
        others = rng.sample([j for j in pool if lines[j] != lines[i]], 3)
        choices = [lines[i]] + [lines[j] for j in others]
        rng.shuffle(choices)
        next_line.append({"context": _context(lines, i), "choices": choices, "answer": choices.index(lines[i])})
    complete_line = []
    for i in gen:
        head, _, last = lines[i].rpartition(" ")
        complete_line.append({"context": _context(lines, i) + head, "answer": " " + last})
    return {"next_line.jsonl": next_line, "complete_line.jsonl": complete_line}


def main() -> None:
    for name, rows in build().items():
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
