#!/usr/bin/env python3
"""MoE-LLaVA's moellava/eval/eval_pope.py scoring, transcribed step for step (spec §6), as the
independent reference for `moellava pope score`. Prints one JSON object in `pope score --json`'s shape
(categories by name; fractions; null where the official script would divide by zero).

  eval_pope_official.py --annotation-dir DIR --question-file Q.jsonl --result-file A.jsonl
"""
import argparse
import json
import os


def eval_pope(answers, label_file):
    label_list = [json.loads(q)["label"] for q in open(label_file, "r")]
    for answer in answers:
        text = answer["text"]
        # Only keep the first sentence
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        if "No" in words or "not" in words or "no" in words:
            answer["text"] = "no"
        else:
            answer["text"] = "yes"
    for i in range(len(label_list)):
        label_list[i] = 0 if label_list[i] == "no" else 1
    pred_list = [0 if a["text"] == "no" else 1 for a in answers]
    pos, neg = 1, 0
    TP = TN = FP = FN = 0
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1
        elif pred == pos and label == neg:
            FP += 1
        elif pred == neg and label == neg:
            TN += 1
        elif pred == neg and label == pos:
            FN += 1
    n = TP + TN + FP + FN
    div = lambda a, b: a / b if b else None  # noqa: E731  (the official script raises here)
    precision, recall = div(TP, TP + FP), div(TP, TP + FN)
    f1 = 2 * precision * recall / (precision + recall) if precision is not None and recall is not None and precision + recall else None
    yes_ratio = div(pred_list.count(1), len(pred_list))
    return {"tp": TP, "fp": FP, "tn": TN, "fn": FN, "accuracy": div(TP + TN, n), "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--annotation-dir")
    ap.add_argument("--question-file")
    ap.add_argument("--result-file")
    args = ap.parse_args()
    questions = [json.loads(line) for line in open(args.question_file)]
    questions = {question["question_id"]: question for question in questions}
    answers = [json.loads(q) for q in open(args.result_file)]
    out = {}
    for file in sorted(os.listdir(args.annotation_dir)):
        assert file.startswith("coco_pope_")
        assert file.endswith(".json")
        category = file[10:-5]
        cur_answers = [x for x in answers if questions[x["question_id"]]["category"] == category]
        out[category] = eval_pope(cur_answers, os.path.join(args.annotation_dir, file))
    f1s = [c["f1"] for c in out.values()]
    print(json.dumps({"categories": out, "mean_f1": sum(f1s) / len(f1s) if f1s and None not in f1s else None}))
