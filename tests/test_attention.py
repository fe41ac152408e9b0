"""attention.py: the mask rule, its backends, running our Qwen3 on the layout, loading and saving
(support/model.py). tests/test_qwen3.py checks the network itself against transformers."""

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attention
import support.data
import support.distributed
import support.flags
import support.model
from conftest import ROOT


def brute_force_mask(rows, block_size):
    """The rule written out token by token, independently of attention.py: list every token as
    (doc, copy, pos) in the documented order, then decide each (query, key) pair with ifs."""
    masks = []
    for row in rows:
        tokens = []
        for d, (length, noisy, noisy_from) in enumerate(row):
            tokens += [(d, 0, p) for p in range(length)]
            starts = range(noisy_from, length, block_size)
            counts = [noisy] * len(starts) if isinstance(noisy, int) else noisy
            copy = 0
            for start, count in zip(starts, counts):  # block after block, each version its own copy
                for _ in range(count):
                    copy += 1
                    tokens += [(d, copy, p) for p in range(start, min(start + block_size, length))]
        masks.append(tokens)
    width = max(len(t) for t in masks)
    out = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    for b, tokens in enumerate(masks):
        for i in range(width):
            for j in range(width):
                if i >= len(tokens) or j >= len(tokens):
                    out[b, 0, i, j] = i == j or (i >= len(tokens) and j >= len(tokens))
                    continue
                (di, ci, pi), (dj, cj, pj) = tokens[i], tokens[j]
                bi, bj = pi // block_size, pj // block_size
                if di != dj:
                    allowed = False
                elif ci == 0 and cj == 0:
                    allowed = bj <= bi
                elif ci > 0 and cj == ci:
                    allowed = bj == bi
                elif ci > 0 and cj == 0:
                    allowed = bj < bi
                else:  # a clean query never sees a noisy key, nor a noisy copy another noisy copy
                    allowed = False
                out[b, 0, i, j] = allowed
    return out


def random_rows(rng, block_size, num_noisy, num_rows=2, max_docs=3):
    rows = []
    for _ in range(num_rows):
        row = []
        for _ in range(rng.randint(1, max_docs)):
            length = (
                block_size * rng.randint(1, 4) + rng.choice([0, 0, 1, 3]) % block_size
            )  # not multiples of 16
            noisy_from = block_size * rng.randint(0, length // block_size)
            if num_noisy == "per block":  # DiPO's replays: each block in as many versions as its rounds
                blocks = len(range(noisy_from, length, block_size))
                row.append((length, [rng.randint(0, 3) for _ in range(blocks)], noisy_from))
            else:
                row.append((length, num_noisy, noisy_from))
        rows.append(row)
    return rows


@pytest.mark.parametrize("num_noisy", [1, 2, 4, "per block"])
@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_dense_mask_equals_brute_force(num_noisy, block_size):
    rng = random.Random(f"{block_size} {num_noisy}")
    for _ in range(3):
        rows = random_rows(rng, block_size, num_noisy)
        layout = attention.make_layout(rows, block_size)
        assert torch.equal(attention.dense_mask(layout), brute_force_mask(rows, block_size)), rows


def test_mask_by_hand_for_one_small_document():
    # length 4, block 2, one noisy copy of the whole document: tokens c0 c1 c2 c3 n0 n1 n2 n3
    layout = attention.make_layout([[(4, 1, 0)]], block_size=2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention.dense_mask(layout)[0, 0], expected)


def test_make_layout_refuses_noisy_copy_off_a_block_boundary_or_miscounted():
    with pytest.raises(ValueError, match="block boundary"):
        attention.make_layout([[(8, 1, 3)]], block_size=4)
    with pytest.raises(ValueError, match="1 noisy counts for the 2 blocks"):
        attention.make_layout([[(8, [1], 0)]], block_size=4)


@pytest.mark.parametrize("num_noisy,block_size", [(1, 4), (2, 2), (4, 8), ("per block", 4)])
def test_flex_forward_equals_sdpa_with_dense_mask(num_noisy, block_size):
    torch.manual_seed(0)
    rows = random_rows(random.Random(7), block_size, num_noisy)
    layout = attention.make_layout(rows, block_size)
    B, N = layout.doc.shape
    q, k, v = (torch.randn(B, 4, N, 16) for _ in range(3))
    block_mask = create_block_mask(attention.block_diffusion_mask_mod(layout), B, None, N, N, device="cpu")
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=block_mask)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.dense_mask(layout))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return support.model.load_model("tiny", seed=1)


def test_backends_agree_through_the_model(tiny):
    model, _ = tiny
    layout = attention.make_layout([[(12, 2, 4), (5, 1, 0)], [(16, 2, 8)]], block_size=4)
    ids = torch.randint(
        4, model.config.vocab_size, layout.doc.shape, generator=torch.Generator().manual_seed(0)
    )
    logits = {}
    with torch.no_grad():
        for backend in ["sdpa", "eager", "flex"]:
            model.attn = backend
            logits[backend] = attention.forward_layout(model, ids, layout)
    model.attn = "sdpa"
    real = layout.doc >= 0  # padding positions carry no meaning
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["flex"][real], logits["sdpa"][real], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention has no CPU backward)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_flex_and_dense_give_the_same_loss_and_gradients_on_cuda(dtype, tol):
    """The training paths: compiled FlexAttention (the CUDA default) against SDPA with the dense
    mask from the same mask_mod, under autocast as sft.py and dipo.py run them."""
    model, _ = support.model.load_model("tiny", seed=1, device="cuda")
    layout = attention.make_layout([[(12, 2, 4), (5, 1, 0)], [(16, 2, 8)]], block_size=4)
    ids = torch.randint(
        4, model.config.vocab_size, layout.doc.shape, generator=torch.Generator().manual_seed(0)
    ).cuda()
    real = (layout.doc >= 0).cuda()
    results = {}
    for backend in ["sdpa", "flex"]:
        model.attn = backend
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = attention.forward_layout(model, ids, layout)
        loss = torch.log_softmax(logits.float(), -1)[real].logsumexp(-1).mean()
        loss.backward()
        results[backend] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert results["flex"][0] == pytest.approx(results["sdpa"][0], rel=tol)
    torch.testing.assert_close(results["flex"][1], results["sdpa"][1], atol=tol, rtol=tol)


def test_fsdp_gathers_weights_in_the_compute_dtype(tmp_path):
    """shard_model with bfloat16: forward in bf16 without autocast (FSDP2 casts the gathered
    weights) while the sharded parameters, which AdamW updates, stay float32. In a process of
    its own: a gloo group left behind in the test process made later forks crash."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import attention
import support.distributed
import support.model
torch.distributed.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
for dtype in (torch.float32, torch.bfloat16):
    model, _ = support.model.load_model("tiny", seed=1)
    support.distributed.shard_model(model, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    layout = attention.make_layout([[(4, 1, 0)]], 4)
    logits = attention.forward_layout(model, torch.tensor([[5, 6, 7, 8] * 2]), layout)
    assert logits.dtype == dtype, dtype
torch.distributed.destroy_process_group()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def block_causal_logits(model, ids, block_size, backend="eager"):
    """Reference: plain sequences [B, N] with an ordinary block-causal mask, built here (block
    size 1: causal). Eager by default, so the check does not rest on sdpa."""
    n = ids.shape[1]
    blk = torch.arange(n) // block_size
    allowed = (blk[None, :] <= blk[:, None])[None, None]  # [1, 1, N, N]
    mask = allowed if backend == "sdpa" else torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf)
    return model.lm_head(model(ids, torch.arange(n).expand_as(ids), mask))


def test_noisy_block_sees_exactly_the_clean_prefix_and_its_own_block(tiny):
    model, _ = tiny
    b, length, noisy_from = 4, 14, 4  # 14 = three full blocks and a partial one
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(4, model.config.vocab_size, (length,), generator=gen)
    noisy = clean.clone()
    noisy[torch.rand(length, generator=gen) < 0.5] = model.config.mask_token_id
    layout = attention.make_layout([[(length, 1, noisy_from)]], block_size=b)
    ids = torch.cat([clean, noisy[noisy_from:]])[None]
    with torch.no_grad():
        packed = attention.forward_layout(model, ids, layout)[0]
        for start in range(noisy_from, length, b):
            end = min(start + b, length)
            alone = torch.cat([clean[:start], noisy[start:end]])[None]
            ref = block_causal_logits(model, alone, b)[0, start:end]
            got = packed[length + start - noisy_from : length + end - noisy_from]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # and the clean copy is an ordinary block-causal pass over x0
        torch.testing.assert_close(
            packed[:length], block_causal_logits(model, clean[None], b)[0], atol=1e-5, rtol=1e-5
        )


def test_mask_is_cached_per_layout():
    a = attention.make_layout([[(8, 1, 0)]], 4)
    again = attention.make_layout([[(8, 1, 0)]], 4)
    other = attention.make_layout([[(8, 1, 4)]], 4)
    for backend in ["sdpa", "flex"]:
        first = attention.attention_mask_for(a, backend, "cpu")
        assert attention.attention_mask_for(again, backend, "cpu") is first
        assert attention.attention_mask_for(other, backend, "cpu") is not first


def test_logits_at_selected_positions_equal_full_logits(tiny):
    model, _ = tiny
    layout = attention.make_layout([[(8, 1, 4)], [(4, 1, 0), (4, 1, 4)]], 4)
    ids = torch.randint(
        4, model.config.vocab_size, layout.doc.shape, generator=torch.Generator().manual_seed(1)
    )
    rows, cols = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([8, 10, 2, 9, 11])
    with torch.no_grad():
        full = attention.forward_layout(model, ids, layout)
        some = attention.forward_layout(model, ids, layout, at=(rows, cols))
    torch.testing.assert_close(some, full[rows, cols])


def test_pack_rows_fills_rows_and_keeps_big_items_alone():
    rows = attention.pack_rows([5, 3, 9, 2, 20, 4], row_len=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    sizes = [5, 3, 9, 2, 20, 4]
    assert all(sum(sizes[i] for i in row) <= 10 or len(row) == 1 for row in rows)
    assert [4] in rows


def test_data_stream_visits_every_item_once_per_pass():
    seen = [d for s in range(5) for _, d in support.data.data_stream(s, 4, 20, seed=3)]
    assert sorted(seen) == list(range(20))
    assert [i for i, _ in support.data.data_stream(2, 4, 20, seed=3)] == [8, 9, 10, 11]


def write_sdar_dir(model, tokenizer, path, with_block_keys):
    """An SDAR-format checkpoint as released: model_type "sdar", custom-code keys, Qwen3 weights."""
    support.model.save_checkpoint(model, tokenizer, path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="sdar",
        architectures=["SDARForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
    )
    if not with_block_keys:
        config.pop("block_size")
        config.pop("mask_token_id")
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("with_block_keys", [True, False])
def test_sdar_dir_loads_as_qwen3_with_same_logits(tiny, tmp_path, with_block_keys):
    model, tokenizer = tiny
    write_sdar_dir(model, tokenizer, tmp_path / "sdar", with_block_keys)
    loaded, loaded_tok = support.model.load_model(tmp_path / "sdar")
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.config.block_size == 4
    assert loaded.config.mask_token_id == loaded_tok.token_id("<|MASK|>")
    ids = torch.randint(4, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            block_causal_logits(loaded, ids, 4), block_causal_logits(model, ids, 4), atol=0, rtol=0
        )


def test_sdar_dir_with_conflicting_mask_id_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    write_sdar_dir(model, tokenizer, tmp_path / "sdar", with_block_keys=True)
    config = json.loads((tmp_path / "sdar" / "config.json").read_text())
    config["mask_token_id"] = 7
    (tmp_path / "sdar" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mask"):
        support.model.load_model(tmp_path / "sdar")


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        support.model.load_model(tmp_path / "nothing")


def test_save_load_roundtrip_gives_identical_logits(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "policy" / "step_000000"
    out.parent.mkdir()
    support.model.save_checkpoint(model, tokenizer, out)
    support.model.save_checkpoint(model, tokenizer, out)  # overwriting a whole checkpoint is allowed
    assert sorted(p.name for p in out.parent.iterdir()) == ["step_000000"]  # no temporary left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ours, tok = support.model.load_model(out)
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            block_causal_logits(ours, ids, 4), block_causal_logits(model, ids, 4), atol=0, rtol=0
        )
    assert tok.encode(["3+4*2"]) == tokenizer.encode(["3+4*2"])


def test_tiny_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = support.model.build_tiny(seed=4)
    after = torch.rand(1)
    b, _ = support.model.build_tiny(seed=4)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_parse_config_precedence(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seed": 5, "attn": "eager"}))
    cfg = support.flags.parse_config(support.model.Config, ["--config", str(path), "--seed", "9"])
    assert (cfg.seed, cfg.attn, cfg.model) == (9, "eager", "tiny")
    path.write_text(json.dumps({"sede": 5}))
    with pytest.raises(ValueError, match="unknown keys"):
        support.flags.parse_config(support.model.Config, ["--config", str(path)])
