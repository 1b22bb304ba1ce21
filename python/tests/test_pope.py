"""moellava.pope_score returns exactly what `moellava pope score --json` prints."""

import json

from conftest import ROOT
from test_model import run_cli

import moellava

POPE = ROOT / "models/moellava-toy/pope"


def test_pope_score_equals_the_cli(tmp_path):
    questions = [json.loads(l) for l in (POPE / "llava_pope_test.jsonl").read_text().splitlines() if l.strip()]
    answers = tmp_path / "answers.jsonl"
    with answers.open("w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": "Yes" if i % 3 else "No"}) + "\n")
    ours = moellava.pope_score(POPE / "coco", POPE / "llava_pope_test.jsonl", answers)
    r = run_cli("pope", "score", "--annotation-dir", str(POPE / "coco"), "--question-file",
                str(POPE / "llava_pope_test.jsonl"), "--result-file", str(answers), "--json")
    assert r.returncode == 0, r.stderr
    assert ours == json.loads(r.stdout)
    assert set(ours["categories"]) == {"adversarial", "popular", "random"}
