"""Build ``pydoc_cloze.jsonl``: a 4-way continuation task on the held-out topics of
``pydoc_data.topics`` (the same topics the demo adapter never trained on).

Each item: a context (the first 24 words of a paragraph), the true continuation (its
next 10 words) and three distractors (the same-position continuations of other
held-out paragraphs). Deterministic (seeded); rerun to regenerate:
``python eval/tasks/make_pydoc_cloze.py``.
"""

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.textdata import embedded_topics  # noqa: E402

CTX, CONT, N = 24, 10, 200


def build(seed: int = 0) -> list[dict]:
    paras = []
    for doc in embedded_topics("heldout"):
        for p in re.split(r"\n\s*\n", doc):
            words = p.split()
            if len(words) >= CTX + CONT and not p.lstrip().startswith((">>>", "...")):
                paras.append((" ".join(words[:CTX]), " " + " ".join(words[CTX : CTX + CONT])))
    rng = random.Random(seed)
    rng.shuffle(paras)
    items = []
    for i, (ctx, cont) in enumerate(paras[:N]):
        pool = [c for j, (_, c) in enumerate(paras) if j != i and c != cont]
        choices = rng.sample(pool, 3) + [cont]
        rng.shuffle(choices)
        items.append({"id": i, "context": ctx, "choices": choices, "label": choices.index(cont)})
    return items


if __name__ == "__main__":
    out = Path(__file__).with_name("pydoc_cloze.jsonl")
    items = build()
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {len(items)} items to {out}")
