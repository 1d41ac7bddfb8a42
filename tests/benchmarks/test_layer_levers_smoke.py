"""benchmarks/layer_levers.py: the quick run writes its section with one row per lever; a pair
that does not compute the same function is refused before any timing; the column that says
which variant megatron_lite runs matches which side of each pair is our own module. Speed is not
asserted (toy shapes on a shared machine measure nothing); the figures are in BENCHMARKS.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import layer_levers as ll

# the variants that run megatron_lite's modules
OURS = (ll.attention, ll.mlp, ll.whole_layer, ll.fused_head, ll.layer_on_onednn)


def test_quick_run_writes_one_row_per_lever(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    rows = ll.main(["--quick", "--out", str(out)])

    assert [r["key"] for r in rows] == list(ll.LEVERS)
    for r in rows:
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert r["off_ms"] > 0 and r["on_ms"] > 0
    text = out.read_text(encoding="utf-8")
    assert "kept" in text and text.index("## Other") < text.index(ll.SECTION)
    assert "- Allocator: glibc malloc " in text  # timed under the trainer's process setup
    block = text[text.index(ll.BEGIN):text.index(ll.END)]
    table = [line for line in block.splitlines() if line.startswith("| `")]
    assert len(table) == len(ll.LEVERS)
    assert all(line.split("|")[5].strip() == ll.verdict(r["speedup"])
               for line, r in zip(table, rows))


def test_a_pair_that_changes_results_is_refused():
    args = ll.parse_args(["--quick"])
    layer = ll.our_layer(args)
    ours = ll.mlp(args, layer)
    m = layer.mlp
    exact_gelu = ll._shared(lambda x: m.fc2(F.gelu(m.fc1(x))), {"mlp": m})  # erf, not tanh
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.seq_length, args.hidden, generator=g)
    grad_out = torch.randn(1, args.seq_length, args.hidden, generator=g)
    ll.check_equal("same", ours, ll.gelu_pointwise(args, layer), x, grad_out, 1e-4, 1e-5)
    with pytest.raises(AssertionError, match="lever wrong: off and on differ in the "):
        ll.check_equal("wrong", ours, exact_gelu, x, grad_out, 1e-4, 1e-5)


@pytest.mark.parametrize("key", list(ll.LEVERS))
def test_the_runs_column_names_the_side_that_is_our_module(key):
    lever = ll.LEVERS[key]
    if lever.ours.startswith("on where"):  # our module's path where a faster lever cannot run
        faster = ll.LEVERS[lever.ours.split("`")[1]]
        assert lever.on is faster.off and faster.on in OURS and lever.off not in OURS
    elif lever.ours == "on":
        assert lever.on in OURS and lever.off not in OURS
    elif lever.ours == "off":
        assert lever.off in OURS and lever.on not in OURS
    else:  # an option: eager by default
        assert lever.off in OURS and "--compile" in lever.ours
