"""A dense GPTModel equals Hugging Face's GPT2LMHeadModel with the same weights."""
import pytest
import torch

from megatron_lite.models import GPTConfig, GPTModel
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters

transformers = pytest.importorskip("transformers")


def to_hf_state_dict(model: GPTModel) -> dict:
    """Our parameter layout -> GPT-2's. HF's Conv1D stores weights [in, out] (transposed), and its
    fused c_attn columns are [q; k; v] over all heads, where ours are head-major [heads, 3, hd]."""
    cfg = model.cfg
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = h // heads
    sd = {"transformer.wte.weight": model.word_embeddings.weight,
          "transformer.wpe.weight": model.position_embeddings.weight,
          "transformer.ln_f.weight": model.final_ln.weight,
          "transformer.ln_f.bias": model.final_ln.bias}
    for i, layer in enumerate(model.layers):
        p = f"transformer.h.{i}."
        qkv_w = layer.attn.qkv.weight.view(heads, 3, hd, h).transpose(0, 1).reshape(3 * h, h)
        qkv_b = layer.attn.qkv.bias.view(heads, 3, hd).transpose(0, 1).reshape(3 * h)
        sd.update({
            p + "ln_1.weight": layer.ln_attn.weight, p + "ln_1.bias": layer.ln_attn.bias,
            p + "attn.c_attn.weight": qkv_w.t(), p + "attn.c_attn.bias": qkv_b,
            p + "attn.c_proj.weight": layer.attn.out.weight.t(), p + "attn.c_proj.bias": layer.attn.out.bias,
            p + "ln_2.weight": layer.ln_mlp.weight, p + "ln_2.bias": layer.ln_mlp.bias,
            p + "mlp.c_fc.weight": layer.mlp.fc1.weight.t(), p + "mlp.c_fc.bias": layer.mlp.fc1.bias,
            p + "mlp.c_proj.weight": layer.mlp.fc2.weight.t(), p + "mlp.c_proj.bias": layer.mlp.fc2.bias,
        })
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def test_dense_gpt_matches_hf_gpt2():
    cfg = GPTConfig(vocab_size=100, num_layers=2, hidden_size=32, num_attention_heads=4,
                    ffn_hidden_size=80, max_position_embeddings=64, layernorm_epsilon=1e-8,
                    hidden_dropout=0.0, attention_dropout=0.0)
    ps = ParallelState.single()
    model = GPTModel(cfg, ps, RNGContext(0)).eval()
    initialize_parameters(model, 99, ps)
    # Non-zero biases and norm parameters, so a misplaced bias or a transposed LN would show.
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.padded_vocab_size, n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_size, activation_function="gelu_new",
        layer_norm_epsilon=cfg.layernorm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours[..., :cfg.vocab_size], theirs[..., :cfg.vocab_size],
                               atol=1e-5, rtol=0)
