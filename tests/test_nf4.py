"""The compiled layers' 4-bit linears (job/speed/nf4.py) compute bitsandbytes' numbers, and keep nothing of a
weight's size for the backward pass."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from conftest import OpCounter  # noqa: E402
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
    """nf4.keep: bitsandbytes dequantizes the weight once, for the run, and every training pass, eager or compiled,
    forward and backward, takes that copy instead of dequantizing again: the same product and gradient bit for bit.
    What the backward pass keeps is that one copy (no new one a step), and it is in no state dict."""
    layer = linear(512, 256, double_quant)
    kept = compiled_matches_bitsandbytes(layer, nf4.keep)
    assert [(tuple(t.shape), t.dtype) for t in kept] == [((512, 256), torch.bfloat16)], kept
    assert torch.equal(kept[0], bnbf.dequantize_4bit(layer.weight, layer.weight.quant_state))
    assert kept[0].data_ptr() == layer.dequantized.data_ptr()          # the run's copy, not one made this step
    assert set(layer.state_dict()) == set(linear(512, 256, double_quant).state_dict())

    # Without gradients (evaluation, generation): bitsandbytes' own operator, as without keep
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad(), OpCounter() as seen:
        out = layer(x)
    assert any(name.startswith("bitsandbytes.") for name in seen.counts), seen.counts
    assert torch.equal(out, bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.weight.quant_state))
    with OpCounter() as seen:                                            # training: the kept copy, no dequantization
        layer(x.requires_grad_())
    assert not any(name.startswith("bitsandbytes.") for name in seen.counts), seen.counts


def test_a_base_stored_in_float16_loads_quantized_from_its_stored_values_with_the_rest_in_the_compute_dtype(
        tiny_model, tmp_path):
    """load_base_model loads the weights as stored (no conversion to the compute dtype on the way, which took an
    H100 1.75 s of Llama-2-7B's load), quantizes the 4-bit ones from the stored values, and converts the rest after:
    the unquantized tensors are those a load converting to the compute dtype gives, bit for bit, and each 4-bit
    weight dequantizes to the compute dtype, within one NF4 step of that load's."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from job.config import from_env
    from job.model import base_shape, load_base_model, load_tokenizer, stored_dtype

    stored = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float16).save_pretrained(stored)
    config = from_env({"BASE_MODEL": str(stored), "REQUIRE_GPU": "false", "COMPUTE_DTYPE": "bfloat16",
                       "LORA_TARGET_MODULES": "all-linear"})
    load_tokenizer(from_env({"BASE_MODEL": str(tiny_model)})).save_pretrained(stored)
    assert stored_dtype(base_shape(config)) == torch.float16
    tokenizer = load_tokenizer(config)
    model = load_base_model(config, tokenizer, "cpu")
    converting = AutoModelForCausalLM.from_pretrained(
        stored, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    new, old = dict(model.named_parameters()), dict(converting.named_parameters())
    assert new.keys() == old.keys()
    quantized = 0
    for name, param in new.items():
        state = getattr(param, "quant_state", None)
        if state is None:
            assert param.dtype == torch.bfloat16, name
            # (the persona tokens' rows added after are the grown vocabulary's, job/model.py)
            torch.testing.assert_close(param[:len(old[name])], old[name], rtol=0, atol=0)
            continue
        quantized += 1
        a = bnbf.dequantize_4bit(param.data, state)
        b = bnbf.dequantize_4bit(old[name].data, old[name].quant_state)
        assert a.dtype == b.dtype == torch.bfloat16, name
        # A value near the middle between two codes may round to the other one: at most NF4's widest gap
        # (0.723 to 1.0) times its block's scale apart; most values take the same code either way (their scales
        # differ in the last bits: the block's largest value, stored or converted).
        assert (a.float() - b.float()).abs().max().item() <= 0.277 * state.absmax.max().item(), name
        codes = [torch.cat([(w.data.view(torch.uint8) >> 4) & 15, w.data.view(torch.uint8) & 15])
                 for w in (param, old[name])]
        assert (codes[0] == codes[1]).float().mean().item() > 0.98, name
    assert quantized > 0
    assert model(input_ids=torch.tensor([[1, 5, 9, 13, 2]])).logits.dtype == torch.bfloat16
