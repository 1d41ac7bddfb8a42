"""benchmarks/sparse_attention.py's memory row counts what each model keeps for its backward
(`kept_for_backward`), exactly: a sparse layer keeps its input x where a dense one keeps the qkv
projection (the block-sparse op projects again in backward), the masked implementation keeps one
[T, T] mask per sparse layer more, and parameters are not counted."""
from benchmarks import sparse_attention as sa


def test_kept_for_backward_counts_the_masked_layers_mask_and_no_parameters(monkeypatch):
    # The dense layers on SDPA's flash kernel, whose kept tensors the identities below count
    # (the blocked CPU path also keeps its probabilities: tests/models/test_gpt.py).
    from megatron_lite.models.blocks import ParallelSelfAttention
    monkeypatch.setattr(ParallelSelfAttention, "blocked_causal_attention", False)
    args = sa.parse_args(["--quick"])
    n = 256
    kept = {}
    for kind in sa.MODELS:
        model = sa.build_model(args, n, kind)
        batch = sa.make_batch(model.cfg, n, args.seed)
        kept[kind] = sa.kept_for_backward(model, batch)
        assert kept[kind] == sa.kept_for_backward(model, batch)  # the same every time
    cfg = sa.model_config(args, n, True)
    sparse_layers = cfg.num_layers // 2
    mask_bytes = sparse_layers * n * n  # at least a bool [T, T] mask per masked sparse layer
    assert kept["masked"] - kept["sparse"] >= mask_bytes
    # Dense layers keep the [T, 3h] projection (q, k, v) for the flash backward; the sparse op
    # keeps x, which the projection's weight gradient keeps in a dense layer anyway, so each
    # sparse layer keeps exactly that projection less (the summary rows are not kept either).
    qkv_bytes = n * 3 * cfg.hidden_size * 4
    assert kept["dense"] - kept["sparse"] == sparse_layers * qkv_bytes
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert kept["dense"] < params  # tiny model: activations at 256 tokens are below its weights
