"""The routing evaluation set and its graders (kvserve/bench/routing_eval.py): the bundled set loads and
is what its script writes; every code item's tests accept its reference solution and reject a stub;
the code sandbox stops loops, memory blow-ups, writes outside its directory and processes; numbers and
facts are graded by the stated rules."""

from __future__ import annotations

import importlib.util
import json
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from kvserve.bench import routing_eval
from kvserve.bench.routing_eval import (EvalItem, extract_code, extract_number, grade, grade_many, load_items,
                                        normalize_text, run_code)

ITEMS = load_items()
CODE = [item for item in ITEMS if item.kind == "code"]
PREFIX = {"code": "code-", "arithmetic": "math-", "fact": "fact-"}


def fenced(source: str) -> str:
    return f"Here is the function:\n\n```python\n{source}\n```\n"


def code_item(entry_point: str = "add", tests: str = "assert add(2, 3) == 5\n") -> EvalItem:
    return EvalItem(id="t-code", kind="code", prompt="?", entry_point=entry_point, tests=tests)


ADD = "def add(a, b):\n    return a + b\n"


# ---- the set

def test_the_set_loads_with_enough_items_of_each_kind():
    counts = Counter(item.kind for item in ITEMS)
    assert len(ITEMS) >= 200
    assert all(counts[kind] >= 60 for kind in ("code", "arithmetic", "fact")), counts
    assert len({item.id for item in ITEMS}) == len(ITEMS)
    for item in ITEMS:
        assert item.id.startswith(PREFIX[item.kind]), item.id
        assert 0 < len(item.prompt) < 300, item.id
    for item in CODE:
        assert f"`{item.entry_point}(" in item.prompt and "```python" in item.prompt, item.id
        assert item.reference and f"def {item.entry_point}(" in item.reference, item.id
    assert Counter(item.difficulty for item in CODE).keys() == {"easy", "medium", "hard"}


def test_the_set_is_what_its_script_writes():
    script = Path(routing_eval.__file__).parent / "data" / "make_routing_eval.py"
    spec = importlib.util.spec_from_file_location("make_routing_eval", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(routing_eval.DATA_PATH, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == module.build_items()


def test_arithmetic_prompts_that_are_plain_expressions_match_their_answers():
    checked = 0
    for item in ITEMS:
        if item.kind == "arithmetic" and item.prompt.startswith("What is ") and "?" in item.prompt:
            expression = item.prompt[len("What is "):item.prompt.index("?")]
            if set(expression) <= set("0123456789.+-*/() "):
                value = eval(expression.replace(" ", ""), {"__builtins__": {}})  # noqa: S307 (our own text)
                assert abs(value - float(item.answer)) < 1e-9, item.id
                checked += 1
    assert checked >= 30


def test_every_reference_solution_passes_and_a_stub_fails():
    references = [fenced(item.reference) for item in CODE]
    stubs = [fenced(f"def {item.entry_point}(*args, **kwargs):\n    return None") for item in CODE]
    results = grade_many(CODE + CODE, references + stubs, timeout_s=20.0, workers=2)
    assert [item.id for item, ok in zip(CODE, results[:len(CODE)]) if not ok] == []
    assert [item.id for item, ok in zip(CODE, results[len(CODE):]) if ok] == []


# ---- loading errors

def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"id": "math-1", "kind": "arithmetic", "prompt": "What is 1 + 1?", "answer": "2"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ({**GOOD, "id": "x", "kind": "poetry"}, "kind must be one of"),
    ({**GOOD, "answer": "two"}, "not a number"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "answer must be"),
    ({**GOOD, "answers": ["2"]}, "fields not used"),
    ({"id": "f", "kind": "fact", "prompt": "?", "answers": []}, "answers must be"),
    ({"id": "c", "kind": "code", "prompt": "?", "entry_point": "not a name", "tests": "assert True"}, "Python name"),
    ({"id": "c", "kind": "code", "prompt": "?", "entry_point": "f"}, "tests must be"),
    (GOOD, "duplicate id"),
])
def test_a_bad_line_is_refused_by_line_number(tmp_path, bad, message):
    path = write_lines(tmp_path / "set.jsonl", [GOOD, bad])
    with pytest.raises(ValueError, match=rf"line 2: .*{message}"):
        load_items(path)


def test_blank_lines_are_skipped(tmp_path):
    path = write_lines(tmp_path / "set.jsonl", [GOOD, "", {**GOOD, "id": "math-2"}])
    assert [item.id for item in load_items(path)] == ["math-1", "math-2"]


# ---- code: extraction and the sandbox

@pytest.mark.parametrize("reply, code", [
    ("Sure:\n```python\nx = 1\n```\nThen:\n```python\nx = 2\n```", "x = 1\n"),
    ("```\nnot this\n```\n```py\nx = 3\n```", "x = 3\n"),
    ("Text\n```\nx = 4\n```", "x = 4\n"),
    ("```python\nx = 5\n", "x = 5\n"),          # cut off at max_tokens
    ("def f():\n    return 6\n", "def f():\n    return 6\n"),
])
def test_the_code_is_extracted_from_the_reply(reply, code):
    assert extract_code(reply) == code


def test_correct_code_passes_and_wrong_or_broken_code_fails():
    item = code_item()
    answers = [fenced(ADD), fenced("def add(a, b):\n    return a - b"), fenced("def add(a, b) return"),
               "I cannot help with that.", "", fenced(ADD + "if __name__ == '__main__':\n    raise SystemExit(1)")]
    assert grade_many([item] * len(answers), answers) == [True, False, False, False, False, True]
    assert grade(item, None) is False


def test_an_endless_loop_times_out_quickly():
    start = time.monotonic()
    assert grade(code_item(), fenced(ADD + "while True:\n    pass"), timeout_s=1.0) is False
    assert time.monotonic() - start < 10
    run = run_code("while True:\n    pass\n", "", timeout_s=0.5)
    assert run.timed_out and not run.passed


def test_writes_and_deletions_outside_the_sandbox_are_refused(tmp_path):
    target, victim = tmp_path / "escaped.txt", tmp_path / "victim.txt"
    victim.write_text("keep me")
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import os\nos.system('touch {target}')",
                f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
                f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
                f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w').write('x')",
                "import os\nos.kill(os.getppid(), 0)",
                "import socket\nsocket.create_connection(('127.0.0.1', 9))"]
    results = grade_many([code_item()] * len(attempts), [fenced(ADD + a) for a in attempts])
    assert results == [False] * len(attempts)
    assert not target.exists() and victim.read_text() == "keep me"
    # Writing inside its own directory (and its TMPDIR) is allowed.
    inside = "open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.TemporaryFile().write(b'x')"
    assert grade(code_item(), fenced(ADD + inside)) is True


def test_memory_files_and_early_exits_are_contained():
    attempts = ["x = bytearray(8 * 1024 ** 3)", "x = [0] * 10 ** 9", "open('big', 'w').write('x' * (4 << 20))",
                "import sys\nsys.exit(0)", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"]
    assert grade_many([code_item()] * len(attempts), [fenced(ADD + a) for a in attempts]) == [False] * len(attempts)


def test_the_output_comes_back_truncated():
    run = run_code("print('x' * 200_000)\nprint('done')\n", "")
    assert run.passed and run.output.endswith("[... output truncated]")
    assert len(run.output) < routing_eval.MAX_OUTPUT_CHARS + 100
    failed = run_code("raise RuntimeError('boom')\n", "")
    assert not failed.passed and failed.returncode == 1 and "RuntimeError: boom" in failed.output


# ---- arithmetic

@pytest.mark.parametrize("reply, expected, ok", [
    ("The answer is 1,234.", "1234", True),
    ("-17", "-17", True),
    ("42.0", "42", True),
    ("42", "42.0", True),
    ("347 * 28 = 9716", "9716", True),
    ("**9,716**", "9716", True),
    ("The change is $10.60.", "10.6", True),
    ("It is \u221235.", "-35", True),
    ("23 - 58 = -35", "-35", True),
    ("35", "-35", False),
    ("1234", "123", False),
    ("1,234,567", "1234567", True),
    ("I think 12, no wait, 13", "13", True),
    ("I do not know.", "5", False),
    ("", "0", False),
])
def test_the_last_number_is_compared_exactly(reply, expected, ok):
    item = EvalItem(id="t-math", kind="arithmetic", prompt="?", answer=expected)
    assert grade(item, reply) is ok


def test_number_extraction():
    assert extract_number("x-3") == Decimal(3)
    assert extract_number("totals 1,250 and 3.5") == Decimal("3.5")
    assert extract_number("v2 has none") is None


# ---- facts

@pytest.mark.parametrize("reply, answers, ok", [
    ("canberra.", ["Canberra"], True),
    ("Paris, France", ["Paris"], True),
    ("Parisian", ["Paris"], False),
    ("Reykjavík", ["Reykjavik"], True),
    ("REYKJAVIK", ["Reykjavík"], True),
    ("Gabriel García Márquez", ["Garcia Marquez", "Marquez"], True),
    ("It is Na (sodium).", ["Na"], True),
    ("Nairobi", ["Na"], False),
    ("Mount Kilimanjaro, in Tanzania.", ["Kilimanjaro"], True),
    ("Sydney", ["Canberra"], False),
    ("", ["Canberra"], False),
])
def test_facts_match_whole_normalised_words(reply, answers, ok):
    item = EvalItem(id="t-fact", kind="fact", prompt="?", answers=tuple(answers))
    assert grade(item, reply) is ok


def test_normalisation():
    assert normalize_text("  Côte d'Ivoire!  ") == "cote d ivoire"
    assert normalize_text("CO₂") == "co2"


def test_grade_many_keeps_the_order_and_checks_lengths():
    items = [EvalItem(id="a", kind="fact", prompt="?", answers=("Lima",)), code_item(),
             EvalItem(id="b", kind="arithmetic", prompt="?", answer="7")]
    assert grade_many(items, ["Lima", fenced(ADD), "6"]) == [True, True, False]
    with pytest.raises(ValueError):
        grade_many(items, ["Lima"])


# ---- calibration (kvserve/bench/routing.py), from recorded rows

def recorded(n=60):
    """Rows as training_rows writes them: prompts with digits the small model gets wrong and the large
    one right (cost 100 on the large model); the rest both get right (small 10, large 30)."""
    from kvserve.routing.predictor import answer_scores

    rows = []
    for i in range(n):
        hard = i % 3 == 0
        rows.append({"id": f"r{i}", "signals": {"first_token_logprob": -0.1 - (i % 5) / 10, "first_token_entropy": 0.3,
                                                "log_turn_tokens": 3.0 + (i % 4) / 10, "code": 0.0,
                                                "digits": 1.0 if hard else 0.0},
                     "answer": answer_scores([-2.5 if hard else -0.1] * 8), "small_ok": not hard, "large_ok": True,
                     "small_cost": 10.0, "prompt_tokens": 20, "small_tokens": 20,
                     "large_cost": 100.0 if hard else 30.0})
    return rows


def test_the_replay_sends_what_the_text_marks_as_hard_straight_to_the_large_model():
    from kvserve.bench.routing import fit, replay

    rows = recorded()
    calibration = fit(rows, hold=8)
    assert calibration.p_small_text({"digits": 1.0}) < 0.2 < 0.8 < calibration.p_small_text({"digits": 0.0})
    result = replay(calibration, rows, tolerance=0.1)
    # Every hard row answered by the large model with no small-model share of the cost; the rest kept small.
    assert result == {"correct": 60, "weighted_cost": 20 * 100.0 + 40 * 10.0, "large": 20}
    result = replay(calibration, rows, tolerance=1.0)            # anything goes: the small model everywhere
    assert result == {"correct": 40, "weighted_cost": 60 * 10.0, "large": 0}


def test_cross_validation_and_the_oracle_at_the_goal():
    from kvserve.bench.routing import cross_validated, oracle

    rows = recorded()
    curve = cross_validated(rows, hold=8, tolerances=(0.1, 1.0), folds=3, repeats=1)
    assert curve["0.1"]["accuracy_vs_large"] == 1.0 and curve["0.1"]["cost_vs_large"] == pytest.approx(2400 / 3200)
    assert curve["1"]["large_share"] == 0.0
    bounds = oracle(rows, goal=0.98)
    # 59 of 60 right reaches 98%: the large model on 19 of the 20 hard rows.
    assert bounds["at_goal"] == {"accuracy_vs_large": round(59 / 60, 4),
                                 "cost_vs_large": round((40 * 10 + 19 * 100 + 10) / 3200, 4)}
    assert bounds["best"] == {"accuracy_vs_large": 1.0, "cost_vs_large": 0.75}


def test_answers_recorded_without_todays_signals_are_refused():
    """A run recorded before the length signal read the latest turn carries log_prompt_tokens, not
    log_turn_tokens: fitting on it would weigh a signal that is 0 everywhere, so it is refused."""
    from kvserve.bench.routing import Answer, training_rows

    item = EvalItem(id="fact-001", kind="fact", prompt="What is the capital of France?", answers=("Paris",))
    old = {"first_token_logprob": -0.1, "first_token_entropy": 0.2, "log_prompt_tokens": 3.9, "code": 0.0,
           "digits": 0.0}
    small = [Answer(item, "small", routing={"signals": old}, logprobs=[-0.1], correct=True)]
    large = [Answer(item, "large", correct=True)]
    with pytest.raises(ValueError, match="log_turn_tokens.*run the small and large modes again"):
        training_rows(small, large, 24)
    small[0].routing = {"signals": {**old, "log_turn_tokens": 2.5}}          # the marker span's length
    with pytest.raises(ValueError, match="signals of version 1.*run the small and large modes again"):
        training_rows(small, large, 24)
    small[0].routing = {"signals": {**old, "log_turn_tokens": 2.5}, "signals_version": 2}
    assert len(training_rows(small, large, 24)) == 1


def test_the_summary_gives_the_ttft_of_each_route():
    from kvserve.bench.routing import Answer, summarize

    item = EvalItem(id="fact-001", kind="fact", prompt="What is the capital of France?", answers=("Paris",))
    routes = [("small", "predicted", 1.0), ("small", "predicted", 3.0), ("large", "predicted", 0.2),
              ("large", "low_confidence", 2.0)]
    answers = [Answer(item, "cascade", model=model, ttft_s=ttft, routing={"reason": reason}, correct=True)
               for model, reason, ttft in routes]
    summary = summarize(answers)
    assert summary["ttft_ms_by_route"]["small:predicted"] == {"answers": 2, "p50": 2000.0, "p95": 2900.0}
    assert summary["ttft_ms_by_route"]["large:low_confidence"]["answers"] == 1
    assert set(summary["ttft_ms_by_route"]) == {"small:predicted", "large:predicted", "large:low_confidence"}
