"""tests/evals/gsm8k/gsm8k_eval.py against a real stack on the tiny model,
with a data file of the release's format written here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import start_engine, start_gateway

SCRIPT = Path(__file__).resolve().parent / "evals" / "gsm8k" / "gsm8k_eval.py"
sys.path.insert(0, str(SCRIPT.parent))
import gsm8k_eval  # noqa: E402

QUESTIONS = [{"question": f"Ann has {n} apples and buys {n + 1} more. How many now?",
              "answer": f"She has {n} + {n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1}.\n"
                        f"#### {2 * n + 1}"} for n in range(1, 5)]


@pytest.mark.parametrize("reply, number", [
    ("3 + 4 = 7. The answer is 7.", 7), ("so 1,234 apples. The answer is: $1,234", 1234),
    ("#### 42", 42), ("first 3, then 5, finally 12", 12), ("no digits here", None),
    ("The answer is -2.5", -2.5)])
def test_the_final_number_is_read(reply, number):
    assert gsm8k_eval.extract(reply) == number


def test_the_reference_answer_is_the_number_after_the_marks():
    assert gsm8k_eval.reference("work...\n#### 1,080") == 1080


def test_a_run_against_a_real_server(tiny_model, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    engine = start_engine(tiny_model, tmp_path)
    gateway = start_gateway(engine.address, tmp_path)
    try:
        port = gateway.url.rsplit(":", 1)[1]
        out = tmp_path / "results.json"
        done = subprocess.run([sys.executable, str(SCRIPT), "--port", port, "--num-questions",
                               "3", "--concurrency", "2", "--max-tokens", "8", "--data-file",
                               str(data), "--output", str(out)],
                              capture_output=True, text=True, timeout=120)
    finally:
        gateway.stop()
        engine.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("Accuracy:", "Tokens/s:", "Time:"):
        assert label in done.stdout
    r = json.loads(out.read_text())
    assert r["num_questions"] == 3 and r["errors"] == 0 and 0 <= r["accuracy"] <= 1
    assert 0 < r["completion_tokens"] <= 24
    assert r["tokens_per_s"] > 0
    assert [x["expected"] for x in r["results"]] == [3, 5, 7]
