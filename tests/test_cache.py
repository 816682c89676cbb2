import pytest
import torch
from transformers import DynamicCache

from kvtune.cache import MixedPrecisionCache, load_cache
from kvtune.errors import PlanError
from kvtune.models import model_shape
from kvtune.plan import LayerPlan, Plan


def _prompts(vocab=256):
    torch.manual_seed(5)
    ids = torch.randint(3, vocab, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding on the second row
    return ids, mask


def _generate(model, cache, new_tokens=24):
    ids, mask = _prompts()
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, cache=cache, pad_token_id=0
    )


def _mixed(num_layers):
    pairs = ["k8v4", "k2v2", "k4v8", "k16v2"]
    return Plan(tuple(LayerPlan.from_pair(pairs[i % 4], group_size=8, residual=4) for i in range(num_layers)))


def test_uniform_16_bit_plan_gives_exactly_the_fp_tokens(tiny_model):
    reference = _generate(tiny_model, DynamicCache(config=tiny_model.config))
    ours = _generate(tiny_model, load_cache(tiny_model, Plan.uniform("k16v16", 3)))
    assert torch.equal(reference, ours)


def test_mixed_plan_generates_with_batch_and_gqa(tiny_model):
    assert tiny_model.config.num_key_value_heads < tiny_model.config.num_attention_heads
    plan = _mixed(3)
    cache = load_cache(tiny_model, plan)
    out = _generate(tiny_model, cache)
    assert out.shape == (2, 12 + 24)
    # The bytes held are exactly what the plan's accounting predicts for that many tokens.
    tokens = cache.get_seq_length()
    assert tokens == 12 + 24 - 1
    assert cache.nbytes() == plan.cache_bytes(model_shape(tiny_model), tokens, batch=2)
    fp = Plan.uniform("k16v16", 3).cache_bytes(model_shape(tiny_model), tokens, batch=2)
    assert cache.nbytes() < 0.7 * fp


def test_quantized_cache_stores_packed_codes_and_changes_the_states(tiny_model):
    plan = Plan.uniform("k2v2", 3, group_size=8, residual=4)
    cache = MixedPrecisionCache(plan)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 20, 32, dtype=torch.float64), torch.randn(1, 2, 20, 32, dtype=torch.float64)
    k_out, v_out = cache.update(k, v, 0)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)  # the call that adds tokens reads them unrounded
    stream = cache.layers[0]._k
    assert stream.quantized.packed.dtype == torch.uint8 and stream.quantized.packed.shape[-1] == 32 * 2 // 8
    assert stream.quantized.num_tokens == 16 and stream.tail.shape[-2] == 4
    k2, _ = cache.update(k[..., :1, :], v[..., :1, :], 0)
    assert k2.shape[-2] == 21
    assert not torch.equal(k2[..., :16, :], k[..., :16, :])  # read back quantized
    assert torch.equal(k2[..., 16:20, :], k[..., 16:20, :])  # residual window exact


def test_wrong_plan_for_model_is_refused(tiny_model):
    with pytest.raises(PlanError, match="has 30 layers but"):
        load_cache(tiny_model, Plan.uniform("k4v4", 30))


def test_beam_search_through_the_16_bit_cache_equals_plain_beam_search(tiny_model):
    ids, mask = _prompts()
    out = tiny_model.generate(
        input_ids=ids[:1], max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0,
        cache=load_cache(tiny_model, Plan.uniform("k16v16", 3)),
    )
    ref = tiny_model.generate(input_ids=ids[:1], max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def _stored(cache):
    """Every tensor the planned layers hold, per layer and stream: packed codes, scales, zeros, tail."""
    out = []
    for layer in cache.layers:
        for k, v in layer._rows or [(layer._k, layer._v)]:
            for stream in (k, v):
                q = stream.quantized
                out.append(((q.packed, q.scale, q.zero) if q is not None else ()) + (stream.tail,))
    return out


def _held(stream):
    """One K or V stream's tokens as it holds them (dequantized codes, then the tail)."""
    if stream._engine is not None:
        return stream._engine.view
    parts = [stream.quantized.dequantize()] if stream.quantized is not None else []
    return torch.cat(parts + ([stream.tail] if stream.tail is not None else []), dim=-2)


def _filled(plan, k, v, left_padding=None):
    cache = MixedPrecisionCache(plan, left_padding=left_padding)
    for layer in range(len(plan)):
        cache.update(k[..., :-1, :] * (layer + 1), v[..., :-1, :] - layer, layer)  # prefill
        cache.update(k[..., -1:, :] * (layer + 1), v[..., -1:, :] - layer, layer)  # one decode step
    return cache


def _assert_same_state(a, b, batch):
    """Same stored tensors, also after one more token (rows picked twice must not share a store)."""
    torch.manual_seed(4)
    k, v = torch.randn(batch, 2, 1, 32, dtype=torch.float64), torch.randn(batch, 2, 1, 32, dtype=torch.float64)
    for _ in range(2):
        left, right = _stored(a), _stored(b)
        assert len(left) == len(right)
        for x, y in zip(left, right):
            assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))
        for layer in range(len(a.layers)):
            a.update(k, v, layer)
            b.update(k, v, layer)


@pytest.mark.parametrize("left_padding", [None, [0, 3, 6]], ids=["batch", "left-padded"])
def test_reordering_a_quantized_cache_equals_the_cache_of_reordered_inputs(left_padding):
    """Beam search's reorder, expansion and selection move every stored tensor of a quantized cache
    (codes, scales, zeros and the tail) with its row: the result equals, bit for bit, the cache
    filled from the reordered inputs, and stays equal as both go on storing tokens."""
    plan = Plan.uniform("k4v2", 3, group_size=8, residual=4)
    torch.manual_seed(3)
    k, v = torch.randn(3, 2, 21, 32, dtype=torch.float64), torch.randn(3, 2, 21, 32, dtype=torch.float64)
    assert all(len(s) == 4 for s in _stored(_filled(plan, k, v, left_padding)))  # every stream holds quantized codes

    def fresh(rows):
        return _filled(plan, k[rows], v[rows], None if left_padding is None else [left_padding[i] for i in rows])

    cache = _filled(plan, k, v, left_padding)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    _assert_same_state(cache, fresh([2, 0, 0]), 3)
    cache = _filled(plan, k, v, left_padding)
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([1, 4]))
    _assert_same_state(cache, fresh([0, 2]), 2)


@pytest.mark.parametrize("pair", ["k2v2", "k[q4_1]v[int4_per_token_head]"])
def test_left_padded_row_equals_the_row_alone(tiny_model, pair):
    """Padding enters no group, scale or byte count: a left-padded row generates exactly what the
    row generates alone, with the same logits, and the cache holds for it the same codes, scales
    and tail as the row's own cache, and the bytes of its real tokens."""
    torch.manual_seed(9)
    plan = Plan(tuple(LayerPlan.from_pair(pair, group_size=8, residual=4) for _ in range(3)))
    ids, mask = _prompts()
    alone_ids = ids[1:, 4:]

    def run(input_ids, attention_mask):
        cache = load_cache(tiny_model, plan, attention_mask=attention_mask)
        out = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=14, do_sample=False,
                                  cache=cache, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        return out, cache

    padded, padded_cache = run(ids, mask)
    alone, alone_cache = run(alone_ids, torch.ones_like(alone_ids))
    assert torch.equal(padded.sequences[1, 4:], alone.sequences[0])
    for a, b in zip(padded.logits, alone.logits):
        assert torch.allclose(a[1], b[0], atol=1e-9, rtol=0)
    for padded_layer, alone_layer in zip(padded_cache.layers, alone_cache.layers):
        for row, own in zip(padded_layer._rows[1], (alone_layer._k, alone_layer._v)):
            assert row.num_quantized == own.num_quantized > 0 and row.num_tail == own.num_tail
            if row.quantized is not None:  # engine formats hold their rounded values instead
                q, a = row.quantized, own.quantized
                assert torch.equal(q.packed, a.packed) and torch.allclose(q.scale, a.scale, atol=1e-6, rtol=0)
                assert torch.allclose(q.zero, a.zero, atol=1e-6, rtol=0)
            assert torch.allclose(_held(row), _held(own), atol=1e-9, rtol=0)
    shape = model_shape(tiny_model)
    tokens = alone_cache.get_seq_length()
    assert alone_cache.nbytes() == plan.cache_bytes(shape, tokens)
    assert padded_cache.nbytes() == plan.cache_bytes(shape, tokens + 4) + plan.cache_bytes(shape, tokens)
    # Without the mask the padding is quantized with the row, and the row's logits move.
    unmasked = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                                   cache=load_cache(tiny_model, plan), pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
    if pair == "k2v2":
        assert not all(torch.allclose(a[1], b[0], atol=1e-9, rtol=0) for a, b in zip(unmasked.logits, alone.logits))


def test_allocated_bytes_follow_the_buffers_not_the_tokens():
    """nbytes() counts the tokens held as the plan does; allocated_bytes() the tensors behind them,
    which grow by doubling: one token past the first chunk allocates room for as many again."""
    from kvtune.cache import _Stream

    spec = LayerPlan.from_pair("k4v4").value  # per-token: every token is stored at once (residual 0)
    stream = _Stream(spec, residual=0)
    stream.store(torch.randn(1, 2, 64, 32))
    first = (stream.nbytes(), stream.allocated_bytes())
    stream.store(torch.randn(1, 2, 1, 32))
    grown = (stream.nbytes(), stream.allocated_bytes())
    for _ in range(63):
        stream.store(torch.randn(1, 2, 1, 32))
    full = (stream.nbytes(), stream.allocated_bytes())
    assert first[0] < grown[0] < full[0]  # logical bytes follow every token
    assert grown[1] > first[1] and full[1] == grown[1]  # the doubled buffer holds the next 63 tokens
    assert full[1] >= full[0]
