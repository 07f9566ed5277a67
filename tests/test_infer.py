"""The inference engine: continuous batching gives exactly the sequential greedy text, seeds make
sampling reproducible whatever shares the batch, penalties match transformers, streamed text
never splits a character or leaks a stop string, and a cancelled request frees its slot."""

import pytest
import torch

from trulyopen.infer.engine import Engine, Request, generate
from trulyopen.infer.sampling import SamplingParams
from trulyopen.infer.text import TextStream


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None,  # no token ends transformers' generate() early
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model's: no near-ties for
        model.lm_head.weight.mul_(30)  # float rounding to flip between two implementations
    return model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def hf_greedy(model, prompt: list[int], n: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt) :].tolist()


def test_continuous_batching_gives_the_sequential_greedy_text(model):
    """12 requests of different lengths through 4 slots: requests join as others leave, and each
    one's text is exactly transformers' greedy generate() of that prompt alone."""
    ps = prompts(12)
    lengths = [3 + (i * 7) % 20 for i in range(12)]  # so that requests finish at different steps
    engine = Engine(model, slots=4, max_len=64)
    reqs = [
        engine.submit(Request(p, SamplingParams(max_new_tokens=n, temperature=0)))
        for p, n in zip(ps, lengths, strict=True)
    ]
    most_running, steps = 0, 0
    while engine.step():
        most_running, steps = max(most_running, len(engine.running)), steps + 1
    assert most_running == 4 and steps < sum(lengths)  # batched, and slots were reused
    for p, n, r in zip(ps, lengths, reqs, strict=True):
        assert r.finish_reason == "length"
        assert r.output == hf_greedy(model, p, n)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    p = prompts(1, seed=5)[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    solo = Engine(model, slots=1, max_len=64)
    alone = solo.submit(Request(p, params))
    while solo.step():
        pass
    alone = alone.output
    engine = Engine(model, slots=8, max_len=64)
    others = [
        engine.submit(Request(q, SamplingParams(max_new_tokens=5, seed=i)))
        for i, q in enumerate(prompts(5, 1))
    ]
    ours = engine.submit(Request(p, params))
    while engine.step():
        pass
    assert ours.output == alone and all(len(o.output) == 5 for o in others)
    assert generate(model, [p], params, seed=7) == generate(model, [p], params, seed=7)
    assert generate(model, [p], params, seed=8) != generate(model, [p], params, seed=7)
    # top-k 1 is greedy, whatever the temperature
    top1 = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1)
    assert generate(model, [p], top1)[0] == hf_greedy(model, p, 10)


def test_repetition_penalty_matches_transformers(model):
    for p in prompts(3, seed=2):
        params = SamplingParams(max_new_tokens=15, temperature=0, repetition_penalty=1.8)
        assert generate(model, [p], params)[0] == hf_greedy(model, p, 15, repetition_penalty=1.8)


def test_stop_tokens_and_the_cache_length(model):
    p = prompts(1, seed=3)[0]
    free = generate(model, [p], SamplingParams(max_new_tokens=10, temperature=0))[0]
    stop = free[4]
    first = free.index(stop)
    out = generate(model, [p], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(stop,)))[0]
    assert out == free[: first + 1]  # the stop token ends the completion and is kept
    engine = Engine(model, slots=2, max_len=len(p) + 4)
    r = engine.submit(Request(p, SamplingParams(max_new_tokens=50, temperature=0)))
    while engine.step():
        pass
    assert r.finish_reason == "length" and len(p) + len(r.output) == engine.max_len
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Request(list(range(1, len(p) + 5)), SamplingParams()))


def test_a_cancelled_request_frees_its_slot_at_once(model):
    engine = Engine(model, slots=1, max_len=128)
    events = []
    long = engine.submit(Request([5, 6, 7], SamplingParams(max_new_tokens=100, temperature=0), events.append))
    short = engine.submit(Request([8, 9], SamplingParams(max_new_tokens=3, temperature=0)))
    for _ in range(3):
        engine.step()
    assert engine.running == [long] and list(engine.waiting) == [short]
    made = len(long.output)
    engine.cancel(long)
    engine.step()
    assert long.finish_reason == "cancelled" and events[-1].finish_reason == "cancelled"
    assert engine.running == [short] and len(long.output) == made  # no more compute spent on it
    while engine.step():
        pass
    assert short.output == hf_greedy(model, [8, 9], 3)


def utf8(ids: list[int]) -> str:
    """A byte-level 'tokenizer': token i is byte i (as byte-level BPE ends tokens mid-character)."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_never_splits_a_character_or_leaks_a_stop_string():
    text = "héllo 日本 wörld<END>never"
    stream = TextStream(utf8, stop_strings=("<END>", "<STOP>"))
    pieces, stopped = [], False
    for b in text.encode():
        piece, stopped = stream.push(b)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "héllo 日本 wörld"
    assert all("\ufffd" not in p and "<" not in p for p in pieces)
    # without a stop: everything arrives, an unfinished character only at the very end
    stream = TextStream(utf8)
    got = "".join(stream.push(b)[0] for b in "añ本".encode()[:-1])
    assert got == "añ" and stream.flush() == "\ufffd"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-through-transformers"])
def test_lean_and_transformers_forward_give_the_same_text(arch, model):
    """The lean forward (qwen2's biases, qwen3's per-head norms) and transformers' own forward
    (used for models outside the family) both decode exactly as transformers' generate()."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from trulyopen.infer import fast

    dims = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(1)
    if arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**dims)).eval()
    elif arch == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **dims)).eval()
    else:
        m = model  # (its head is already sharpened by the fixture)
    if m is not model:
        with torch.no_grad():
            m.lm_head.weight.mul_(30)
    engine = Engine(m, slots=3, max_len=64)
    if arch.endswith("transformers"):
        engine.fast = None
    else:
        assert fast.supports(m) and engine.fast is not None
    ps = prompts(5, seed=4)
    reqs = [engine.submit(Request(p, SamplingParams(max_new_tokens=12, temperature=0))) for p in ps]
    while engine.step():
        pass
    assert [r.output for r in reqs] == [hf_greedy(m, p, 12) for p in ps]


def test_single_stream_shortcuts_agree_with_the_batched_path():
    """One bf16 row decodes with a matrix-vector product and three-product attention (faster on
    a CPU); they compute what F.linear and SDPA compute, to bf16's rounding."""
    import torch.nn.functional as F

    from trulyopen.infer.fast import _attend, _linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(_linear(x, layer), F.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=2e-2)
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(2))  # grouped: 4 heads a kv head
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.25, enable_gqa=True)
    torch.testing.assert_close(_attend(q, k, v, None, 0.25).float(), want, rtol=2e-2, atol=2e-2)
