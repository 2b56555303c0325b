"""Text sources: the embedded default everywhere; WikiText-2, C4 and Alpaca from ../shared/data."""

from __future__ import annotations

import pytest

from helpers import SHARED_DATA
from pipeline.textdata import embedded_topics, load_texts
from pipeline.config import TextSource
from pipeline.errors import InputError

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")


def test_embedded_split_is_disjoint_and_complete():
    train, held, everything = embedded_topics("train"), embedded_topics("heldout"), embedded_topics("all")
    assert len(held) == (len(everything) + 4) // 5 and len(train) + len(held) == len(everything)
    from pydoc_data.topics import topics

    names = sorted(topics)
    assert held == [topics[n] for n in names[::5]]  # every fifth topic by name, the rest in train
    assert train == [topics[n] for i, n in enumerate(names) if i % 5]


@needs_shared
def test_wikitext_c4_alpaca_from_shared_data():
    wiki = load_texts(TextSource(source="file", path=str(SHARED_DATA / "wikitext-2-raw-test.txt")))
    assert len(wiki) == 1 and " = Robert Boulter = " in wiki[0][:200]
    c4 = load_texts(TextSource(source="file", path=str(SHARED_DATA / "c4-sample.jsonl")))
    assert len(c4) == 300
    held = load_texts(TextSource(source="file", path=str(SHARED_DATA / "alpaca-en-1k.json"), format="alpaca"))
    train = load_texts(
        TextSource(source="file", path=str(SHARED_DATA / "alpaca-en-1k.json"), format="alpaca", split="train")
    )
    assert (len(held), len(train)) == (100, 899)
    assert held[0].startswith("### Instruction:\n") and "### Response:\n" in held[0]


def test_bad_jsonl_line_is_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: not a JSON object with field 'text'"):
        load_texts(TextSource(source="file", path=str(f)))
