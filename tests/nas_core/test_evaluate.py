"""Edit and health metrics on a model whose logits are set by hand, and the collapse verdict's edges."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nas_core.collapse import CollapseSettings, HealthSnapshot, norm_growth_per_edit, norm_ratios, verdict
from nas_core.evaluate import health
from nas_core.evaluate.counterfact import edit_metrics, edit_metrics_and_facts, harmonic_mean
from nas_core.evaluate.fluency import fluency, greedy_generations, ngram_entropy
from nas_core.evaluate.health import OptionItem, option_accuracy, option_items, perplexity
from nas_core.evaluate.scoring import length_batches, target_scores
from nas_core.prompts import encode, target_ids
from nas_core.requests import EditRequest, NeighbourhoodPrompt


class BigramModel(nn.Module):
    """logits at position t = ``table[input_ids[t]]``: the next-token distribution is set by hand.

    Exposes what the scorers use: ``base_model(...)`` returning ``last_hidden_state`` (one-hot
    of the input ids), ``get_output_embeddings()`` (a linear map to the table rows), ``config``
    and a full forward returning ``logits``.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = nn.Linear(vocab, vocab, bias=False)
        nn.init.zeros_(self.head.weight)
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.vocab = vocab

    @property
    def base_model(self):
        def run(input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, self.vocab).float())

        return run

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set(self, prev: int, nxt: int, logit: float) -> None:
        with torch.no_grad():
            self.head.weight[nxt, prev] = logit

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.base_model(input_ids).last_hidden_state))

    def logp(self, prev: int, nxt: int) -> float:
        """log p(nxt | prev), computed directly from the table (the hand calculation)."""
        return float(torch.log_softmax(self.head.weight[:, prev].detach().double(), 0)[nxt])


def seq_prob(model: BigramModel, tok, prompt: str, target: str) -> float:
    """exp(mean token log-prob) of ``target`` after ``prompt``, by hand."""
    ids = encode(tok, prompt) + target_ids(tok, target)
    n = len(target_ids(tok, target))
    lp = [model.logp(ids[i - 1], ids[i]) for i in range(len(ids) - n, len(ids))]
    return math.exp(sum(lp) / n)


WORDS = ("<bos> <pad> the eiffel tower is located in where ? it city of capital france paris rome michael jordan "
         "plays a player soccer basketball tokyo asia africa angola italy germany").split()


@pytest.fixture(scope="module")
def wtok():
    """A word-level tokenizer: every word is one token, so each target is a single transition."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tk.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>")


@pytest.fixture
def bigram(wtok):
    return BigramModel(len(wtok))


def last(tok, prompt: str) -> int:
    return encode(tok, prompt)[-1]


def boost(model: BigramModel, tok, prompt: str, target: str, logit: float) -> None:
    """Raise the logit of ``target``'s (single) token after ``prompt``'s last token."""
    (t,) = target_ids(tok, target)
    model.set(last(tok, prompt), t, logit)


def test_target_scores_match_hand_computation(wtok, bigram):
    tok = wtok
    prompt, target = "The capital of France is", "Paris Rome"
    ids = target_ids(tok, target)
    assert len(ids) >= 2
    bigram.set(last(tok, prompt), ids[0], 5.0)  # first target token is the argmax, the rest are not
    s = target_scores(bigram, tok, [prompt, "Tokyo is a city in"], [target, "Asia"])
    expected = -math.log(seq_prob(bigram, tok, prompt, target))
    assert s.nll[0].item() == pytest.approx(expected, rel=1e-5)
    assert s.total_nll[0].item() == pytest.approx(expected * len(ids), rel=1e-5)
    # Only the first token is top-1 (the rest of the table is flat: argmax picks token 0, not the target).
    assert s.token_accuracy[0].item() == pytest.approx(1 / len(ids))


def test_length_batches_bound_rows_and_tokens():
    lengths = [5, 30, 2, 2, 9, 40, 7, 3]
    batches = length_batches(lengths, max_rows=3, max_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20  # a too-long row goes alone
    assert [5] in batches and [1] in batches


def _batch_cost(batches, lengths, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


def _best_cost(lengths, max_rows, max_tokens, overhead):
    """The least cost of any split of the sorted rows into runs, by trying every set of cuts."""
    ordered = sorted(lengths)
    n, best = len(ordered), None
    for mask in range(2 ** max(n - 1, 0)):
        cuts = [0] + [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
        runs = [ordered[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        if all(len(r) == 1 or (len(r) <= max_rows and len(r) * r[-1] <= max_tokens) for r in runs):
            cost = sum(len(r) * r[-1] + overhead for r in runs)
            best = cost if best is None else min(best, cost)
    return best


def test_length_batches_find_the_least_padding_plus_overhead():
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.choice([rng.randint(2, 20), rng.randint(50, 400)]) for _ in range(rng.randint(1, 10))]
        rows, tokens, overhead = rng.randint(1, 6), rng.choice([64, 512, 4096]), rng.choice([0, 16, 64])
        batches = length_batches(lengths, rows, tokens, overhead)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert _batch_cost(batches, lengths, overhead) == _best_cost(lengths, rows, tokens, overhead)


def test_length_batches_do_not_pad_short_rows_to_a_long_one():
    lengths = [10] * 8 + [400]
    batches = length_batches(lengths, max_rows=32, max_tokens=4096, overhead_tokens=64)
    assert batches == [list(range(8)), [8]]  # the greedy fill padded all nine rows to 400 tokens


def test_target_scores_do_not_depend_on_batching(wtok, bigram):
    prompts = ["The capital of France is", "Tokyo is a city in", "The Eiffel Tower is located in the city of", "A"]
    targets = ["Paris Rome", "Asia", "Paris", "B C D"]
    bigram.set(last(wtok, prompts[0]), target_ids(wtok, "Paris")[0], 4.0)
    # Repeated prompts with one-token targets share a forward row; each pair keeps its own score.
    prompts, targets = [*prompts, prompts[1], prompts[0]], [*targets, "Europe", "Paris"]
    whole = target_scores(bigram, wtok, prompts, targets)
    one_by_one = target_scores(bigram, wtok, prompts, targets, batch_size=64, batch_tokens=1)
    alone = [target_scores(bigram, wtok, [p], [t]) for p, t in zip(prompts, targets, strict=True)]
    for field in ("nll", "token_accuracy", "total_nll"):
        torch.testing.assert_close(getattr(whole, field), getattr(one_by_one, field))
        torch.testing.assert_close(getattr(whole, field), torch.cat([getattr(a, field) for a in alone]))


def test_edit_metrics_success_magnitude_and_score(wtok, bigram):
    tok = wtok
    edit_prompt = "The Eiffel Tower is located in"
    para = "Where is the Eiffel Tower? It is in the city of"
    neigh = "The capital of France is"
    req = EditRequest("c1", "The {} is located in", "Eiffel Tower", "Rome", "Paris",
                      paraphrase_prompts=(para,), neighbourhood_prompts=(NeighbourhoodPrompt(neigh, "Paris"),))
    assert req.filled_prompt == edit_prompt
    boost(bigram, tok, edit_prompt, "Rome", 4.0)  # edit prompt: new wins
    boost(bigram, tok, para, "Paris", 3.0)  # paraphrase: true still wins
    boost(bigram, tok, neigh, "Paris", 2.0)  # neighbour keeps its answer
    m = edit_metrics(bigram, tok, [req])
    assert m.n_requests == 1
    assert m.efficacy_success == 100.0
    assert m.generalisation_success == 0.0
    assert m.specificity_success == 100.0
    expect_em = 100 * (seq_prob(bigram, tok, edit_prompt, "Rome") - seq_prob(bigram, tok, edit_prompt, "Paris"))
    expect_pm = 100 * (seq_prob(bigram, tok, para, "Rome") - seq_prob(bigram, tok, para, "Paris"))
    expect_nm = 100 * (seq_prob(bigram, tok, neigh, "Paris") - seq_prob(bigram, tok, neigh, "Rome"))
    assert m.efficacy_magnitude == pytest.approx(expect_em, rel=1e-4)
    assert m.generalisation_magnitude == pytest.approx(expect_pm, rel=1e-4) and expect_pm < 0
    assert m.specificity_magnitude == pytest.approx(expect_nm, rel=1e-4)
    assert m.editing_score == 0.0  # harmonic mean with a zero


def test_edit_metrics_macro_average_over_requests(wtok, bigram):
    tok = wtok
    # Request A: 2 paraphrases, one won; request B: 1 paraphrase, won -> (50 + 100) / 2 = 75, not 2/3.
    a = EditRequest("a", "The {} is located in", "Eiffel Tower", "Rome", "Paris",
                    paraphrase_prompts=("Eiffel Tower is in", "The Eiffel Tower is in the city of"))
    b = EditRequest("b", "{} plays", "Michael Jordan", "soccer", "basketball",
                    paraphrase_prompts=("Michael Jordan is a player of",))
    boost(bigram, tok, "Eiffel Tower is in", "Rome", 3.0)
    boost(bigram, tok, "The Eiffel Tower is in the city of", "Paris", 3.0)
    boost(bigram, tok, "Michael Jordan is a player of", "soccer", 3.0)
    assert last(tok, "Eiffel Tower is in") != last(tok, "The Eiffel Tower is in the city of")
    m = edit_metrics(bigram, tok, [a, b])
    assert m.generalisation_success == pytest.approx(75.0)
    assert m.specificity_success is None  # no neighbourhood prompts at all
    assert m.editing_score == pytest.approx(harmonic_mean([m.efficacy_success, 75.0]))
    # The per-fact scores come from the same pass: their wins are the efficacy success.
    same, facts = edit_metrics_and_facts(bigram, tok, [a, b])
    assert same == m and len(facts) == 2
    assert 100.0 * sum(f.passed for f in facts) / 2 == pytest.approx(m.efficacy_success)
    assert all(0.0 <= f.p_new <= 1.0 and 0.0 <= f.p_true <= 1.0 for f in facts)


def test_harmonic_mean():
    assert harmonic_mean([100.0, 50.0, 100.0]) == pytest.approx(75.0)
    assert harmonic_mean([80.0, None]) == 80.0
    assert harmonic_mean([None]) is None
    assert harmonic_mean([90.0, 0.0]) == 0.0


def test_perplexity_of_a_flat_model_is_the_vocabulary_size(wtok, bigram):
    tok = wtok
    ids = encode(tok, "The Eiffel Tower is located in Paris. The capital of France is Paris.")
    assert perplexity(bigram, ids, window=5, batch_size=2) == pytest.approx(len(tok), rel=1e-5)
    # A confident bigram on one transition lowers it by exactly that transition's gain.
    bigram.set(ids[0], ids[1], 6.0)
    n = len(ids) - 1  # one window: every transition, only the first one (from <bos>) is boosted
    got = perplexity(bigram, ids, window=len(ids), batch_size=1)
    expected = math.exp(-(bigram.logp(ids[0], ids[1]) + (n - 1) * -math.log(len(tok))) / n)
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(bigram, ids[:1])


@pytest.mark.parametrize("head_rows", [1, 2, 3])
def test_perplexity_is_the_same_whatever_the_head_chunk(wtok, bigram, monkeypatch, head_rows):
    ids = encode(wtok, "The Eiffel Tower is located in Paris. The capital of France is Paris.")
    bigram.set(ids[4], ids[5], 6.0)  # a transition inside a window, past the first chunks
    bigram.set(ids[-2], ids[-1], 3.0)
    monkeypatch.setattr(health, "_HEAD_ROWS", 10**6)
    whole = perplexity(bigram, ids, window=len(ids), batch_size=1)
    assert whole < len(wtok) * 0.9  # the boosts count
    monkeypatch.setattr(health, "_HEAD_ROWS", head_rows)
    assert perplexity(bigram, ids, window=len(ids), batch_size=1) == pytest.approx(whole, rel=1e-6)


def test_option_accuracy_by_likelihood(wtok, bigram):
    tok = wtok
    items = [OptionItem("Tokyo is a city in", ("Asia", "Africa"), 0),
             OptionItem("Angola is a", ("Asia", "Africa"), 1),
             OptionItem("Rome is a city of", ("Italy", "Germany"), 1)]
    boost(bigram, tok, items[0].prompt, "Asia", 4.0)
    boost(bigram, tok, items[1].prompt, "Africa", 4.0)
    boost(bigram, tok, items[2].prompt, "Italy", 4.0)
    assert option_accuracy(bigram, tok, items) == pytest.approx(200 / 3)


def test_option_items_formats_every_task():
    recs = {
        "sst2": {"sentence": "great film", "label": 1},
        "mrpc": {"sentence1": "a", "sentence2": "b", "label": 0},
        "cola": {"sentence": "Sam ate.", "label": 1},
        "rte": {"sentence1": "a", "sentence2": "b", "label": 1},
        "nli": {"sentence1": "a", "sentence2": "b", "label": "entailment"},
        "mmlu": {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    }
    labels = {task: option_items(task, [r])[0].label for task, r in recs.items()}
    assert labels == {"sst2": 1, "mrpc": 0, "cola": 1, "rte": 1, "nli": 0, "mmlu": 1}
    assert option_items("mmlu", [recs["mmlu"]])[0].options == ("A", "B", "C", "D")
    with pytest.raises(KeyError, match="unknown general task"):
        option_items("squad", [{}])


def test_ngram_entropy_by_hand():
    # bigrams (a,b),(b,a),(a,b): H = h(1/3) ; trigrams (a,b,a),(b,a,b): H = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("paris paris paris paris paris") == 0.0
    assert ngram_entropy("one") == 0.0


def test_fluency_generates_from_prompts(tok, llama):
    texts = greedy_generations(llama, tok, ["The Eiffel Tower is"], max_new_tokens=5)
    assert len(texts) == 1 and isinstance(texts[0], str)
    value = fluency(llama, tok, ["The Eiffel Tower is", "Tokyo is"], max_new_tokens=5)
    assert value is not None and value >= 0
    assert fluency(llama, tok, [], max_new_tokens=5) is None


# ---------------------------------------------------------------- the collapse verdict


def test_verdict_edges():
    s = CollapseSettings(min_editing_score=60, max_perplexity_ratio=2, max_general_drop=10, max_norm_ratio=1.5)
    at_limits = HealthSnapshot(editing_score=60.0, perplexity=20.0, base_perplexity=10.0, general_mean=40.0,
                               base_general_mean=50.0, norm_ratios={"w3": 1.5, "w4": 1.0})
    v = verdict(at_limits, s)
    assert not v.collapsed and len(v.checks) == 4 and v.failed == ()
    beyond = HealthSnapshot(editing_score=59.99, perplexity=20.01, base_perplexity=10.0, general_mean=39.9,
                            base_general_mean=50.0, norm_ratios={"w3": 1.0, "w4": 1.51})
    v = verdict(beyond, s)
    assert v.collapsed
    assert [c.name for c in v.failed] == ["editing_score", "perplexity_ratio", "general_drop", "norm_ratio"]
    assert "w4" in v.failed[-1].message and "collapse" in v.summary()


def test_verdict_nan_fails_and_missing_is_skipped():
    v = verdict(HealthSnapshot(perplexity=float("nan"), base_perplexity=10.0, norm_ratios={"a": 1.1, "b": math.inf}))
    assert {c.name for c in v.failed} == {"perplexity_ratio", "norm_ratio"}
    assert verdict(HealthSnapshot()).checks == ()
    assert not verdict(HealthSnapshot(editing_score=None, perplexity=5.0)).checks  # no base: skipped


def test_collapse_settings_validate():
    with pytest.raises(ValueError, match="min_editing_score"):
        CollapseSettings(min_editing_score=101)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        CollapseSettings(max_norm_ratio=0.5)


def test_norm_ratio_helpers():
    r = norm_ratios({"a": 2.0, "b": 3.0}, {"a": 1.0, "b": 3.0})
    assert r == {"a": 2.0, "b": 1.0}
    assert norm_growth_per_edit(r, 4) == pytest.approx(0.25)
    assert norm_growth_per_edit(r, 0) == 0.0


def test_option_accuracy_with_multi_token_options_scores_whole_options(wtok, bigram):
    tok = wtok
    # "italy germany" is two tokens: the teacher-forced path sums both tokens' log-probs.
    item = OptionItem("Rome is a city of", ("italy germany", "germany"), 0)
    boost(bigram, tok, item.prompt, "italy", 4.0)
    assert option_accuracy(bigram, tok, [item]) == 100.0  # log p(italy) + log p(germany|italy) > log p(germany)
    bigram.set(last(tok, "italy"), target_ids(tok, "germany")[0], -20.0)
    assert option_accuracy(bigram, tok, [item]) == 0.0


def _pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    import random

    from tiny import CORPUS

    rng, words = random.Random(seed), " ".join(CORPUS).split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    targets = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    return prompts + prompts[:10], targets + [rng.choice(words) for _ in range(10)]  # shared forward rows too


def test_scores_of_any_split_into_shards_are_the_unsharded_scores_bit_for_bit(llama, tok):
    from nas_core.evaluate.scoring import merge_scores, plan_scores, score_batches

    prompts, targets = _pairs(120)
    whole = target_scores(llama, tok, prompts, targets, batch_size=8, batch_tokens=120)
    plan = plan_scores(tok, prompts, targets, batch_size=8, batch_tokens=120)
    assert plan.n_pairs == 130 and len(plan.batches) > 10
    for n in (1, 2, 3, 7, 10_000):
        shards = plan.shards(n)
        assert len(shards) == min(n, len(plan.batches)) and all(shards)
        assert sorted(id(b) for s in shards for b in s) == sorted(id(b) for b in plan.batches)  # each batch once
        loads = [sum(b.padded_tokens for b in s) for s in shards]
        assert max(loads) - min(loads) <= max(b.padded_tokens for b in plan.batches)  # about equal work
        got = merge_scores(plan, [score_batches(llama, plan.pad_id, s) for s in reversed(shards)])
        for field in ("nll", "token_accuracy", "total_nll"):
            assert torch.equal(getattr(got, field), getattr(whole, field)), (n, field)


def test_merging_refuses_a_missing_or_a_repeated_shard(llama, tok):
    from nas_core.evaluate.scoring import merge_scores, plan_scores, score_batches

    plan = plan_scores(tok, *_pairs(30), batch_size=4, batch_tokens=60)
    first, second = (score_batches(llama, plan.pad_id, s) for s in plan.shards(2))
    with pytest.raises(ValueError, match=r"missing"):
        merge_scores(plan, [first])
    with pytest.raises(ValueError, match=r"more than once"):
        merge_scores(plan, [first, second, second])
    with pytest.raises(ValueError, match="shards must be >= 1"):
        plan.shards(0)


def test_edit_metrics_scored_by_another_scorer_are_the_same(llama, tok):
    from nas_core.evaluate.scoring import merge_scores, score_batches

    prompts, targets = _pairs(12, seed=1)
    reqs = [EditRequest(case_id=str(i), prompt=p + " {}", subject="x", target_new=t, target_true=targets[(i + 1) % 12],
                        paraphrase_prompts=(prompts[(i + 2) % 12],),
                        neighbourhood_prompts=(NeighbourhoodPrompt(prompts[(i + 3) % 12], targets[i]),))
            for i, (p, t) in enumerate(zip(prompts[:12], targets[:12], strict=True))]
    seen = []

    def in_three(model, plan):
        seen.append(plan.n_pairs)
        return merge_scores(plan, [score_batches(model, plan.pad_id, s) for s in plan.shards(3)])

    assert edit_metrics(llama, tok, reqs, 4, 64, scorer=in_three) == edit_metrics(llama, tok, reqs, 4, 64)
    assert seen == [2 * 12 * 3]
