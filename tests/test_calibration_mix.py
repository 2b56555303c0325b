"""Calibration that fits the fine-tune: instruction/chat records rendered as in training (the
tokenizer's chat template, else the Alpaca prompt), mixes of text sources by weight, windows packed
with whole records; exact token sequences on the tiny tokenizer."""

from __future__ import annotations

import json

import pytest

from helpers import make_tokenizer, tiny_config
from pipeline import check
from pipeline.config import CalibrationMix, TextSource
from pipeline.errors import InputError
from pipeline.textdata import (
    alpaca_prompt,
    calibration_set,
    load_texts,
    pack_records,
    record_tokens,
    render_record,
    window_shares,
)

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
RECORDS = [
    {"instruction": "Add two and three.", "input": "", "output": "Five."},
    {"instruction": "Name a colour.", "input": "sky", "output": "Blue."},
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = make_tokenizer()
    t.chat_template = TEMPLATE
    return t


def ids(t, text):
    return t(text, add_special_tokens=False).input_ids


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_records_use_the_chat_template_when_the_tokenizer_has_one(chat_tok, tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", RECORDS)
    src = TextSource(name="a", source="file", path=str(f), format="alpaca", split="all")
    toks = record_tokens(chat_tok, src, 10_000)
    bos, eos, nl = 0, 1, ids(chat_tok, "\n")
    # <s> and </s> are the tokenizer's special tokens (ids 0 and 1), not spelled out in bytes
    assert toks[0] == [bos, *ids(chat_tok, "user\nAdd two and three."), eos, *nl] + [
        bos,
        *ids(chat_tok, "assistant\nFive."),
        eos,
        *nl,
    ]
    # the input follows the instruction after a blank line, in the user's turn
    assert toks[1][: 1 + len(ids(chat_tok, "user\nName a colour.\n\nsky"))] == [
        bos,
        *ids(chat_tok, "user\nName a colour.\n\nsky"),
    ]
    assert render_record(RECORDS[0], "alpaca", "alpaca", chat_tok) == alpaca_prompt(RECORDS[0])  # pinned


def test_without_a_chat_template_records_use_the_alpaca_prompt(tok, tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", RECORDS)
    src = TextSource(name="a", source="file", path=str(f), format="alpaca", split="all")
    assert record_tokens(tok, src, 10_000) == [ids(tok, alpaca_prompt(r)) for r in RECORDS]
    with pytest.raises(InputError, match="needs a tokenizer with a chat template"):
        load_texts(src.model_copy(update={"template": "chat"}), tok)


def test_chat_records_messages_and_sharegpt(chat_tok, tok, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    f = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": msgs}, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}],
    )
    src = TextSource(name="c", source="file", path=str(f), format="chat", split="all")
    a, b = record_tokens(chat_tok, src, 10_000)
    assert a == b == [0, *ids(chat_tok, "user\nHi"), 1, 200, 0, *ids(chat_tok, "assistant\nHello"), 1, 200]
    assert load_texts(src, tok) == ["### Instruction:\nHi\n\n### Response:\nHello"] * 2
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(InputError, match="line 1 is not one of the chat records"):
        load_texts(src.model_copy(update={"path": str(tmp_path / "bad.jsonl")}), tok)


def test_pack_records_keeps_records_whole():
    sep = [9]
    recs = [[1] * 5, [2] * 3, [3] * 4, [4] * 12, [5] * 2]
    wins, st = pack_records(recs, seq_len=10, n_windows=3, sep=sep, seed=0)
    # every window is whole records joined by the separator; the 12-token record is cut into a full
    # window and a tail of 2 that is packed like a record
    for w in wins:
        assert len(w) <= 10
    flat = [tuple(x) for w in wins for x in _split(w, 9)]
    pieces = [(1,) * 5, (2,) * 3, (3,) * 4, (4,) * 10, (4,) * 2, (5,) * 2]
    assert all(flat.count(p) <= pieces.count(p) for p in flat)  # only whole records (or the cut's pieces)
    assert (4,) * 10 in flat  # the full piece of the long record is a window of its own
    left_out = [p for p in pieces if flat.count(p) < pieces.count(p)]
    assert all(len(w) + 1 + len(p) > 10 for p in left_out for w in wins)  # nothing left out would have fit
    assert st["tokens"] == sum(map(len, wins)) and st["records_cut"] == 1
    assert st["records"] == len({p for p in flat if p[0] != 4})
    # exact result for this seed (first fit in the seeded shuffle)
    assert pack_records([[1] * 6, [2] * 3, [3] * 3], 10, 2, sep, seed=0)[0] in (
        [[1] * 6 + [9] + [2] * 3, [3] * 3],
        [[1] * 6 + [9] + [3] * 3, [2] * 3],
        [[2] * 3 + [9] + [3] * 3, [1] * 6],
        [[3] * 3 + [9] + [2] * 3, [1] * 6],
        [[2] * 3 + [9] + [1] * 6, [3] * 3],
        [[3] * 3 + [9] + [1] * 6, [2] * 3],
    )


def _split(w, sep):
    out, cur = [], []
    for x in w:
        if x == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(x)
    return out + [cur]


def test_window_shares_by_weight():
    def mix(*w):
        return CalibrationMix(
            name="m", mix=[{"name": f"p{i}", "source": "embedded", "weight": x} for i, x in enumerate(w)]
        )

    assert window_shares(mix(0.5, 0.5), 16) == [8, 8]
    assert window_shares(mix(3, 1), 4) == [3, 1]
    assert window_shares(mix(0.3, 0.7), 16) == [5, 11]  # 4.8 / 11.2: largest remainder first
    assert window_shares(TextSource(), 7) == [7]
    with pytest.raises(InputError, match=r"part\(s\) \['p1'\] get no window of 4"):
        window_shares(mix(0.95, 0.05), 4)


def test_mix_of_records_and_text_exact_tokens(chat_tok, tmp_path):
    recs = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.title()}."} for w in "one two three four".split()]
    f = _write_jsonl(tmp_path / "a.jsonl", recs * 10)
    web = _write_jsonl(
        tmp_path / "web.jsonl", [{"text": f"web page {i}: the class of an object. " * 3} for i in range(40)]
    )
    mix = CalibrationMix.model_validate(
        {
            "name": "fit",
            "mix": [
                {"name": "sft", "source": "file", "path": str(f), "format": "alpaca", "split": "all", "weight": 3},
                {"name": "web", "source": "file", "path": str(web), "weight": 1},
            ],
        }
    )
    rows, comp = calibration_set(chat_tok, mix, num_samples=4, seq_len=64)
    sep = ids(chat_tok, "\n\n")
    rendered = {
        tuple(
            ids(
                chat_tok,
                chat_tok.apply_chat_template(
                    [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                    tokenize=False,
                ),
            )
        )
        for r in recs
    }
    web_docs = {tuple(ids(chat_tok, json.loads(line)["text"])) for line in web.read_text().splitlines()}
    assert [p["windows"] for p in comp["parts"]] == [3, 1]
    for i, r in enumerate(rows):
        assert r["attention_mask"] == [1] * len(r["input_ids"]) and len(r["input_ids"]) <= 64
        # the first three windows hold whole rendered records, the last whole web documents, joined by sep
        assert _decompose(r["input_ids"], rendered if i < 3 else web_docs, sep), i
    assert comp["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert comp["parts"][0]["tokens"] == sum(len(r["input_ids"]) for r in rows[:3])
    assert comp["parts"][0]["template"] == "chat" and comp["parts"][1]["template"] is None
    assert comp["parts"][0]["records_cut"] == 0 and comp["parts"][0]["records"] >= 6
    assert comp["parts"][0]["token_share"] + comp["parts"][1]["token_share"] == pytest.approx(1, abs=1e-3)
    assert comp["fill"] > 0.8


def _decompose(row, docs, sep) -> bool:
    """Whether ``row`` is exactly ``doc sep doc sep ... doc`` with every doc in ``docs``."""
    i = 0
    while True:
        doc = next((d for d in docs if tuple(row[i : i + len(d)]) == d), None)
        if doc is None:
            return False
        i += len(doc)
        if i == len(row):
            return True
        if row[i : i + len(sep)] != sep:
            return False
        i += len(sep)


def test_start_of_run_check_counts_each_part_of_a_mix(tiny_base, tiny_adapter, tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", RECORDS)  # about 85 tokens
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={
            "num_samples": 4,
            "calibration": {
                "name": "fit",
                "mix": [
                    {"name": "pydoc", "source": "embedded", "split": "train", "weight": 0.5},
                    {
                        "name": "sft",
                        "source": "file",
                        "path": str(f),
                        "format": "alpaca",
                        "split": "all",
                        "weight": 0.5,
                    },
                ],
            },
        },
    )
    with pytest.raises(
        InputError,
        match=r"requantize.calibration.mix\[1\] \(text source 'sft'\) gives \d+ tokens, "
        r"fewer than requantize.num_samples x seq_len = 2 x 128 \(its share of the mix\)",
    ):
        check.check_run(cfg)
    ok = cfg.model_copy(deep=True)
    ok.requantize.calibration.mix[1].path = str(_write_jsonl(tmp_path / "b.jsonl", RECORDS * 40))
    check.check_run(ok)  # enough text in every part


def test_mix_paths_are_taken_against_the_config_folder(tmp_path, tiny_base, tiny_adapter):
    import yaml

    from pipeline.config import load_config

    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "a.jsonl", RECORDS)
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs").model_dump(mode="json")
    cfg["requantize"]["calibration"] = {
        "name": "fit",
        "mix": [{"name": "sft", "source": "file", "path": "data/a.jsonl", "format": "alpaca", "weight": 1}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml")
    assert c.requantize.calibration.mix[0].path == str(tmp_path / "data" / "a.jsonl")
    cfg["requantize"]["calibration"]["mix"][0]["path"] = "data/missing.jsonl"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match=r"requantize.calibration.mix\[0\] \(text source 'sft'\): file .* not found"):
        load_config(tmp_path / "c.yaml")


def test_an_alternative_with_its_own_calibration_is_checked_and_tagged(tiny_base, tiny_adapter, tmp_path):
    from pipeline import gptq

    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={
            "alternatives": [
                {"calibration": {"name": "tiny", "source": "embedded", "split": "train", "max_tokens": 100}},
                {"damp_percent": 0.05},
            ]
        },
    )
    with pytest.raises(
        InputError, match=r"requantize.alternatives\[0\].calibration \(text source 'tiny'\) gives 100 tokens"
    ):
        check.check_run(cfg)
    rq = cfg.requantize
    tags = [gptq.tag(gptq.resolve(rq, a), rq) for a in rq.alternatives]
    assert tags == ["4bit-g32-act-cal-tiny", "4bit-g32-act-damp0.05"]
    assert gptq.resolve(rq, rq.alternatives[0]).calibration.name == "tiny"


def test_requantize_inputs_name_every_calibration_file(tiny_base, tiny_adapter, tmp_path):
    """The requantize stage's input record (what resume compares) holds each file of a mix and of
    every alternative's own calibration set, so editing any of them re-runs GPTQ."""
    from pipeline import fingerprint

    a, b, c = (_write_jsonl(tmp_path / f"{n}.jsonl", RECORDS) for n in "abc")
    part = {"source": "file", "format": "alpaca", "split": "all"}
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={
            "calibration": {
                "name": "fit",
                "mix": [{"name": "pydoc", "source": "embedded", "weight": 1}, {"name": "sft", "path": str(a), **part}],
            },
            "alternatives": [{"calibration": {"name": "b", "path": str(b), **part}}],
        },
        eval={"datasets": [{"name": "c", "path": str(c), **part}]},
    )
    files = fingerprint.inputs(cfg, "requantize")["files"]
    assert set(files) >= {"requantize.calibration.mix[1].path", "requantize.alternatives[0].calibration.path"}
    assert "eval.datasets[0].path" not in files  # read by evaluate, not by requantize
    assert "eval.datasets[0].path" in fingerprint.inputs(cfg, "evaluate")["files"]
    before = files["requantize.calibration.mix[1].path"]
    import os

    st = os.stat(a)  # the same text re-provisioned (a new modification time): not a change
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint.inputs(cfg, "requantize")["files"]["requantize.calibration.mix[1].path"] == before
    _write_jsonl(a, RECORDS[:1])
    assert fingerprint.inputs(cfg, "requantize")["files"]["requantize.calibration.mix[1].path"] != before
