"""Recall@K and zero-shot accuracy on hand-made cases whose answers are known."""
import pytest
import torch

from common.metrics import retrieval_metrics, zeroshot_classifier, zeroshot_metrics


def test_recall_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2.
    txt2img = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([
        # c0   c1   c2   c3   c4
        [0.1, 0.9, 0.0, 0.2, 0.3],   # image 0: best caption c1 (a GT) -> i2t rank 0
        [0.5, 0.1, 0.4, 0.6, 0.0],   # image 1: its only caption c2 (0.4) is beaten by c0, c3 -> rank 2
        [0.0, 0.0, 0.9, 0.1, 0.8],   # image 2: best GT c4 (0.8) beaten by c2 -> rank 1
    ])
    m = retrieval_metrics(sim, txt2img)
    # i2t ranks [0, 2, 1]: R@1 = 1/3, R@5 = R@10 = 1
    assert abs(m["i2t_r1"] - 100 / 3) < 1e-4 and m["i2t_r5"] == 100 and m["i2t_r10"] == 100
    # t2i (column-wise): c0 -> img0 0.1 vs 0.5, 0.0 -> rank 1; c1 -> rank 0; c2 -> 0.4 vs 0.0, 0.9 -> rank 1;
    # c3 -> 0.1 vs 0.2, 0.6 -> rank 2; c4 -> 0.8 vs 0.3, 0.0 -> rank 0. R@1 = 2/5.
    assert abs(m["t2i_r1"] - 40) < 1e-4 and m["t2i_r5"] == 100
    assert abs(m["r_mean"] - (100 / 3 + 100 + 100 + 40 + 100 + 100) / 6) < 1e-4


def test_ties_count_against_the_model():
    # A collapsed model (all scores equal) must not get perfect recall.
    txt2img = torch.arange(20).repeat_interleave(2)
    m = retrieval_metrics(torch.zeros(20, 40), txt2img)
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["t2i_r10"] == 0
    # a tie between a GT caption and another image's caption: rank 1, so R@1 fails, R@5 holds
    sim = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    m = retrieval_metrics(sim, torch.tensor([0, 1]))
    assert m["i2t_r1"] == 50 and m["i2t_r5"] == 100
    # t2i: text 0 ties? column 0 = [1, 0] -> rank 0; column 1 = [1, 2] -> rank 0
    assert m["t2i_r1"] == 100


def test_nan_scores_count_as_misses():
    """A diverged model (NaN similarities) must score 0, not 100, or it would be kept as 'best'."""
    m = retrieval_metrics(torch.full((20, 40), float("nan")), torch.arange(20).repeat_interleave(2))
    assert m["r_mean"] == 0
    z = zeroshot_metrics(torch.full((4, 7), float("nan")), torch.tensor([0, 1, 2, 3]))
    assert z["zeroshot_top1"] == 0 and z["zeroshot_top5"] == 0


def test_recall_at_10_over_many_candidates():
    n = 30
    sim = torch.eye(n)
    sim[0, 0] = -1  # image 0's caption below 29 others (all 0) -> rank 29
    sim[1, 1] = 0.0  # tie with 28 zeros -> rank 28
    m = retrieval_metrics(sim, torch.arange(n))
    assert abs(m["i2t_r10"] - 100 * 28 / 30) < 1e-4
    assert abs(m["t2i_r1"] - 100 * 28 / 30) < 1e-4


def test_zeroshot_top1_top5_with_ties():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],   # label 4: 4 ahead -> top-5 only
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],   # label 5: 5 ahead -> neither
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 1: tie with class 0 -> not top-1, top-5
    ])
    m = zeroshot_metrics(logits, torch.tensor([0, 4, 5, 1]))
    assert m["zeroshot_top1"] == 25 and m["zeroshot_top5"] == 75


def test_zeroshot_classifier_averages_normalised_template_embeddings():
    # encode_text returns one fixed vector per prompt string; check the per-class ensembling.
    table = {"a x": [3.0, 0.0], "b x": [0.0, 1.0], "a y": [1.0, 1.0], "b y": [-1.0, 1.0]}

    class Tok:
        def __call__(self, texts, context_length):
            return torch.tensor([list(table).index(t) for t in texts])

    def encode_text(ids):
        return torch.tensor([table[list(table)[i]] for i in ids.tolist()])

    w = zeroshot_classifier(encode_text, Tok(), ["x", "y"], ["a {}", "b {}"], 8, "cpu")
    s = 2 ** -0.5
    torch.testing.assert_close(w, torch.tensor([[s, s], [0.0, 1.0]]))


def test_caption_metrics_on_hand_made_captions():
    from common.metrics import caption_metrics
    refs = {1: ["a large red circle on a white background", "a red circle"],
            2: ["two shapes: a blue square and a green triangle", "a blue square left of a green triangle"]}
    perfect = caption_metrics({1: refs[1][0], 2: refs[2][1]}, refs)
    assert abs(perfect["bleu4"] - 1.0) < 1e-6 and abs(perfect["rouge_l"] - 1.0) < 1e-6
    assert perfect["meteor"] > 0.9
    wrong = caption_metrics({1: "a dog runs in the park", 2: "people eat pizza at a table"}, refs)
    assert wrong["bleu4"] < 1e-3 and wrong["cider"] < 0.05 and wrong["rouge_l"] < 0.3
    # hand-checkable: identical captions give BLEU-4 = ROUGE-L = 1; no shared n-gram gives ~0


def test_rerank_changes_the_ranking_as_the_itm_head_says():
    """rerank_topk (ALBEF, BLIP): the top-2 texts of image 0 get ITM + similarity, the rest -100."""
    from common.metrics import rerank_topk
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]])     # two images, four texts
    table = {(0, 0): -5.0, (1, 0): 5.0, (2, 0): 9.0, (3, 0): 9.0}           # ITM prefers text 1 over text 0
    table.update({(t, 1): 0.0 for t in range(4)})
    itm = lambda texts, images: torch.tensor([table[(int(t), int(i))] for t, i in zip(texts, images)])  # noqa: E731
    scores, _ = rerank_topk(sim, (0, 2), 2, itm, 3, add_similarity=True)
    assert scores[:1].tolist() == [[pytest.approx(-4.1), pytest.approx(5.8), -100.0, -100.0]]
    assert scores[0].argmax().item() == 1 and sim[0].argmax().item() == 0   # the re-rank flipped the top-1


def test_image_tokens_are_kept_in_the_runs_precision(tiny):
    """Evaluation keeps the encoder tokens in the dtype of --precision, not in torch's default
    autocast dtype for the device (fp16 on CUDA even for a bf16 run, bf16 on CPU for an fp16 one)."""
    import json
    import os
    from common.metrics import image_tokens
    with open(os.path.join(tiny, "val.json")) as f:
        paths = [os.path.join(tiny, r["image"]) for r in json.load(f)[:2]]

    def encode(images):
        return images.flatten(2).transpose(1, 2)[:, :4]
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        assert image_tokens(encode, paths, 16, 2, 0, torch.device("cpu"), precision).dtype == dtype


@pytest.mark.parametrize("prediction, answers, want", [
    ("two", ["2"] * 10, 1.0),                                  # number words -> digits
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),                  # min(n / 3, 1) over the 10 subsets of 9
    ("red", ["red"] + ["blue"] * 9, 0.3),                      # one human: 1/3 in 9 of the 10 subsets
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
    ("green", ["red"] * 10, 0.0),
    ("a dog", ["dog"] * 10, 1.0),                              # articles
    ("The Dog.", ["dog", "dog", "a dog"] + ["cat"] * 7, 0.6),  # case, period; the humans' "a dog" keeps its article
    ("yes.", ["yes"] * 10, 1.0),
    ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),                 # contractions
    ("1,000", ["1000"] * 5 + ["1,000"] * 5, 1.0),              # digit groups lose their comma on both sides
    ("left side", ["left-side", "left"] + ["right"] * 8, 0.3),  # "-" becomes a space when it touches none
    ("yes!", ["yes!"] * 10, 0.0),                              # unanimous humans are not normalised (official)
])
def test_vqa_accuracy_hand_made_cases(prediction, answers, want):
    from common.metrics import vqa_accuracy
    assert vqa_accuracy(prediction, answers) == pytest.approx(want)
