"""VQAv2 accuracy (common.metrics.vqa_accuracy) against the official evaluation code as LAVIS 1.0.2
ships it (lavis/common/vqa_tools/vqa_eval.py, the VQA challenge's vqaEval.py) on 3,000 generated
questions whose predictions and 10 human answers mix number words, articles, contractions, case,
punctuation touching and not touching spaces, digit groups and periods, plus unanimous answers.
Not collected by pytest; runs in LAVIS's environment (.ci/run runs it):

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/check_vqa.py

Exits non-zero when any question's accuracy differs by more than 1e-9."""
import contextlib
import io
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.metrics import vqa_accuracy  # noqa: E402
from tests.lavis import peer  # noqa: E402

PIECES = ["two", "2", "ten", "none", "0", "a", "an", "the", "dog", "Dog", "dogs", "dont", "don't", "isnt", "yes", "no",
          "yes.", "No!", "left-side", "left side", "1,000", "1000", "3.5", "red/blue", "(red)", "red,", "it's", "its",
          "somebody'd", "oclock", "?", "e.g.", "t-shirt", "t shirt", "black & white", "black and white"]


def phrase(rng):
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))


def main():
    peer.import_lavis()                        # lavis/__init__ imports every model (spacy stubbed)
    from lavis.common.vqa_tools.vqa_eval import VQAEval
    rng = random.Random(0)
    questions = {}
    for q in range(3000):
        pool = [phrase(rng) for _ in range(rng.randint(1, 4))]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + [phrase(rng)])
        questions[q] = (prediction, answers)

    class Annotations:        # the two VQA objects VQAEval reads: .qa and getQuesIds()
        def __init__(self, qa):
            self.qa = qa

        def getQuesIds(self):
            return list(self.qa)
    gts = Annotations({q: {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(ans)],
                           "question_type": "t", "answer_type": "a"} for q, (_, ans) in questions.items()})
    res = Annotations({q: {"answer": pred} for q, (pred, _) in questions.items()})
    official = VQAEval(gts, res, n=12)
    with contextlib.redirect_stdout(io.StringIO()):
        official.evaluate()
    worst, bad = 0.0, []
    for q, (pred, answers) in questions.items():
        ours = 100 * vqa_accuracy(pred, answers)
        diff = abs(ours - official.evalQA[q])
        worst = max(worst, diff)
        if diff > 1e-9:
            bad.append((pred, answers, ours, official.evalQA[q]))
    mean = sum(official.evalQA.values()) / len(questions)
    print(f"VQA accuracy of {len(questions)} generated questions: official mean {mean:.4f}, largest difference "
          f"{worst:.2e}; {sum(v == 100 for v in official.evalQA.values())} at 100, "
          f"{sum(v == 0 for v in official.evalQA.values())} at 0")
    for case in bad[:5]:
        print("differs:", case)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
