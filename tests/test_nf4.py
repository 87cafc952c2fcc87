"""The compiled layers' 4-bit linears (job/speed/nf4.py) compute bitsandbytes' numbers, and keep nothing of a
weight's size for the backward pass."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from job.speed import nf4  # noqa: E402


def linear(rows, cols, double_quant, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=double_quant)._quantize("cpu")
    return layer


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320), (512, 2752)])
def test_a_dequantized_weight_is_bitsandbytes_own_bit_for_bit(shape, double_quant):
    weight = linear(*shape, double_quant).weight
    assert weight.quant_state.nested is double_quant
    ours = nf4.dequantize(weight, weight.quant_state, torch.bfloat16)
    assert torch.equal(ours, bnbf.dequantize_4bit(weight, weight.quant_state))
    assert torch.equal(nf4.dequantize(weight, weight.quant_state, torch.bfloat16, for_backward=True), ours)


def compiled_matches_bitsandbytes(layer, replace) -> list[torch.Tensor]:
    """`replace(layer)`, then the layer eager and compiled under AOTAutograd's min-cut partitioner (as inductor
    uses it on a GPU) gives bitsandbytes' product and input gradient bit for bit; returns what the compiled
    forward kept for the backward pass."""
    x = torch.randn(6, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    expected = bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.weight.quant_state)
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    assert replace(layer) == 1
    assert torch.equal(layer(x), expected)                     # eager: bitsandbytes' own path

    compiled = torch.compile(layer, backend="aot_eager_decomp_partition", dynamic=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)
    return kept


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_compiled_linear_gives_bitsandbytes_product_and_gradient_and_keeps_only_the_packed_weight(double_quant):
    layer = linear(512, 256, double_quant)
    kept = compiled_matches_bitsandbytes(layer, nf4.use)
    # The packed weight (already in memory) and nothing of the dequantized weight's size or the codes'
    assert [(tuple(t.shape), t.dtype) for t in kept] == [((256 * 512 // 2, 1), torch.uint8)], kept


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_compiled_linear_that_keeps_its_weight_gives_bitsandbytes_numbers_and_keeps_the_dequantized_weight(
        double_quant):
    """nf4.keep: bitsandbytes dequantizes the weight once, in the forward pass, and the backward pass takes that
    copy instead of dequantizing again: the same product and gradient bit for bit, a bf16 weight kept."""
    layer = linear(512, 256, double_quant)
    kept = compiled_matches_bitsandbytes(layer, nf4.keep)
    assert [(tuple(t.shape), t.dtype) for t in kept] == [((512, 256), torch.bfloat16)], kept
    assert torch.equal(kept[0], bnbf.dequantize_4bit(layer.weight, layer.weight.quant_state))
