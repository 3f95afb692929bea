"""The harness adapter's log-likelihoods equal a direct fp64 computation with the model."""
from __future__ import annotations

import torch
from eval_helpers import ByteTokenizer, tiny_model
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from pldr_dist.eval.lm_eval_adapter import PLDRLM
from pldr_dist.eval.model_io import g_from_prompt, with_fixed_g

TOK = ByteTokenizer()
PAIRS = [("The sky", " is blue"), ("a", "b"), ("Hello there,", " general"),
         ("x" * 90, " longer than the window"), ("", "empty context"), ("Hi ", "trailing space")]
DOCS = ["short doc", "a rolling document " * 9, "q" * 64]   # 171 bytes: three windows of 64


@torch.no_grad()
def direct_logprob(model, tokens: list[int], n: int):
    """Sum of log p of the last n tokens and whether each was the argmax, one row, no batching."""
    tokens = tokens[-(model.cfg.context_length + 1):]
    logits = model(torch.tensor([tokens[:-1]]))[0].double()
    logprobs = torch.log_softmax(logits, -1)[-n:]
    targets = torch.tensor(tokens[1:][-n:])
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool(logprobs.argmax(-1).eq(targets).all())


def direct_rolling(model, tokens: list[int]) -> float:
    """Disjoint windows by hand: chunk [start, end) of the document is predicted from the
    context_length tokens before `end` (the end-of-sequence token stands before the text)."""
    window, seq, total = model.cfg.context_length, [model.cfg.eos_id] + tokens, 0.0
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        inp = seq[max(0, end - window):end]
        total += direct_logprob(model, inp + [tokens[end - 1]], end - start)[0]
    return total


def direct_pair(model, context: str, continuation: str):
    if not context:
        return direct_logprob(model, [TOK.eos_id] + TOK.encode(continuation), len(TOK.encode(continuation)))
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    cont = TOK.encode(continuation)
    return direct_logprob(model, TOK.encode(context) + cont, len(cont))


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_adapter_loglikelihoods_match_direct_fp64_for_learned_and_fixed_g():
    assert get_model("pldr") is PLDRLM
    learned = tiny_model()
    fixed = with_fixed_g(learned, g_from_prompt(learned, [learned.cfg.eos_id]))
    for model in (learned, fixed):
        lm = PLDRLM(model=model, tokenizer=TOK, batch_size=4)
        got = lm.loglikelihood(requests("loglikelihood", PAIRS))
        for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
            want, want_greedy = direct_pair(model, context, continuation)
            assert abs(logprob - want) < 1e-9 * max(1.0, abs(want)), (context, logprob, want)
            assert greedy == want_greedy
        rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
        for doc, logprob in zip(DOCS, rolling):
            want = direct_rolling(model, TOK.encode(doc))
            assert abs(logprob - want) < 1e-9 * abs(want), (doc[:10], logprob, want)


def test_is_greedy_true_for_the_models_own_greedy_continuation():
    """With a fixed G the logits are causal, so greedy decoding's tokens score as greedy."""
    learned = tiny_model(seed=1)
    model = with_fixed_g(learned, g_from_prompt(learned, [learned.cfg.eos_id]))
    lm = PLDRLM(model=model, tokenizer=TOK, batch_size=2)
    context = TOK.encode("abc")
    cont = []
    for _ in range(5):
        cont.append(int(model(torch.tensor([context + cont]))[0, -1].argmax()))
    other = [(cont[0] + 1) % model.cfg.vocab_size] + cont[1:]
    (lp, greedy), (lp_other, greedy_other) = lm._loglikelihood_tokens(
        [(None, context, cont), (None, context, other)])
    assert greedy and not greedy_other and lp > lp_other


def test_generate_until_matches_greedy_generation_and_cuts_at_stop_sequence():
    model = tiny_model(seed=2)
    lm = PLDRLM(model=model, tokenizer=TOK, batch_size=3)
    from pldr_dist.infer.generate import SamplingConfig, generate
    prompts = ["abc", "xyz", "hello"]
    free = lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 6}) for p in prompts]))
    for p, text in zip(prompts, free):
        ids = generate(model, [TOK.encode(p)], SamplingConfig(max_new_tokens=6)).tokens[0]
        assert text == TOK.decode([t for t in ids if t != model.cfg.eos_id])
    stops = [t[1:2] or "\x00" for t in free]
    cut = lm.generate_until(requests("generate_until", [(p, {"until": [s], "max_gen_toks": 6})
                                                        for p, s in zip(prompts, stops)]))
    for text, stop, c in zip(free, stops, cut):
        assert c == (text[:text.find(stop)] if stop in text else text)
