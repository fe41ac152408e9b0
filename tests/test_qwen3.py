"""support/qwen3.py against its oracle, transformers' Qwen3ForCausalLM: the same logits and
gradients on random weights, checkpoints that go both ways, and an SDAR-sized model that
samples a block and takes a DiPO step. Also: no stage imports transformers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import Qwen3Config as HFConfig
from transformers import Qwen3ForCausalLM as HFQwen3

import attention
import dipo
import rollout
import support.model
from conftest import ROOT
from support.qwen3 import Qwen3Config, Qwen3ForCausalLM

SHAPES = {  # GQA in both, q/k norms everywhere, tied and untied heads, two RoPE thetas
    "gqa2-untied-theta1e4": dict(num_attention_heads=4, num_key_value_heads=2, tie=False, theta=1e4),
    "gqa4-tied-theta1e6": dict(num_attention_heads=8, num_key_value_heads=2, tie=True, theta=1e6),
}


def oracle_pair(num_attention_heads, num_key_value_heads, tie, theta, seed=0):
    """transformers' Qwen3 with random weights (norms included, so q/k norm matters) and ours
    holding the same tensors."""
    sizes = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16)
    sizes.update(num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    sizes.update(max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=0, pad_token_id=0)
    theirs = HFQwen3(HFConfig(**sizes, rope_theta=theta)).eval()
    theirs.config._attn_implementation = "eager"
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1))
    ours = Qwen3ForCausalLM(Qwen3Config(**sizes, rope_theta=theta)).eval()
    ours.load_state_dict(theirs.state_dict())
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    return theirs, ours


def our_causal_logits(model, ids, positions):
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # [1, 1, N, N]
    return model.lm_head(model(ids, positions, causal))


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_gradients_equal_transformers(shape):
    """Causal attention over positions that start at 37 (RoPE off its first angles): our model
    with our mask against transformers' own causal mask, to 1e-5; then a loss's gradients."""
    theirs, ours = oracle_pair(**SHAPES[shape])
    ids = torch.randint(0, 61, (3, 21), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(37, 58).expand(3, -1)
    logits = {
        "ours": our_causal_logits(ours, ids, positions),
        "theirs": theirs(input_ids=ids, position_ids=positions).logits,
    }
    torch.testing.assert_close(logits["ours"], logits["theirs"], atol=1e-5, rtol=1e-5)
    for name, model in (("ours", ours), ("theirs", theirs)):
        torch.log_softmax(logits[name], -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
    grads = {name: p.grad for name, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():  # to 1e-5 of each gradient's scale (some entries reach 30)
        scale = float(grads[name].abs().max())
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_backends_equal_transformers_on_the_block_diffusion_layout():
    """A packed layout with noisy copies, each of our backends against transformers running
    its eager attention under the same additive mask."""
    theirs, ours = oracle_pair(**SHAPES["gqa2-untied-theta1e4"])
    layout = attention.make_layout([[(12, 2, 4), (5, 1, 0)], [(16, 2, 8)]], block_size=4)
    ids = torch.randint(4, 61, layout.doc.shape, generator=torch.Generator().manual_seed(0))
    additive = attention.attention_mask_for(layout, "eager", "cpu")
    real = layout.doc >= 0
    with torch.no_grad():
        reference = theirs(
            input_ids=ids, attention_mask={"full_attention": additive}, position_ids=layout.pos
        )
        for backend in attention.BACKENDS:
            ours.attn = backend
            got = attention.forward_layout(ours, ids, layout)
            torch.testing.assert_close(got[real], reference.logits[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoints_go_both_ways(tmp_path, tie):
    """Ours saved -> AutoModelForCausalLM and AutoTokenizer; transformers' saved -> load_model."""
    shape = SHAPES["gqa4-tied-theta1e6" if tie else "gqa2-untied-theta1e4"]
    theirs, ours = oracle_pair(**shape)
    tokenizer = support.model.build_char_tokenizer()
    ours.config.block_size, ours.config.mask_token_id = 4, tokenizer.token_id("<|MASK|>")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits

        support.model.save_checkpoint(ours, tokenizer, tmp_path / "ours")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

        theirs.save_pretrained(tmp_path / "theirs")
        tokenizer.save(tmp_path / "theirs")  # the mask token lives in the tokenizer
        mine, _ = support.model.load_model(tmp_path / "theirs")
        torch.testing.assert_close(our_causal_logits(mine, ids, positions), expected, atol=1e-5, rtol=1e-5)
    assert mine.config.tie_word_embeddings == tie and loaded.config.tie_word_embeddings == tie
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    text = support.model.render_prompt("12+(3*4)=?", "")
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode([text])[0]
    assert hf_tokenizer.decode(tokenizer.encode([text])[0]) == text
    chat = [{"role": "user", "content": "1+2"}]
    rendered = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == support.model.render_chat(chat, add_generation_prompt=True)


SDAR_1_7B = dict(  # SDAR-1.7B-Chat's config.json, two layers instead of 28
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    """An SDAR-format checkpoint of SDAR-1.7B's widths and vocabulary, in bfloat16 as released."""
    path = tmp_path_factory.mktemp("sdar")
    tokenizer = support.model.build_char_tokenizer()
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**SDAR_1_7B))
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: (torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape)).bfloat16()
        for name, p in model.named_parameters()
    }
    save_file(weights, path / "model.safetensors")
    config = dict(SDAR_1_7B, model_type="sdar", architectures=["SDARForCausalLM"], block_size=4)
    config.update(auto_map={"AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdar_sized_model_samples_a_block_and_takes_a_dipo_step(sdar_dir, dtype):
    model, tokenizer = support.model.load_model(sdar_dir, dtype=dtype)
    assert model.config.vocab_size == 151936 and model.config.mask_token_id == tokenizer.token_id("<|MASK|>")
    prompt = tokenizer.encode([support.model.render_prompt("1+2", "")])[0][:20]  # whole blocks: one new block
    cfg = rollout.Config(strategy="low_confidence_static", denoising_steps=2, max_new_tokens=4)
    with torch.no_grad():
        (result,) = rollout.generate(model.eval(), [prompt], [torch.Generator().manual_seed(0)], cfg, set())
    assert len(result["response_ids"]) == 4 and sorted(set(result["step_map"])) == [0, 1]
    record = dict(prompt_ids=prompt, **result)
    batch = attention.replay_batch([record], model.config.mask_token_id, 4, model.config.eos_token_id, 0)
    model.train()
    if dtype == torch.bfloat16:  # a bf16 matmul against an untransposed weight takes seconds on a CPU
        for name, p in model.named_parameters():  # (70 s for this backward), so in bf16 the step trains
            p.requires_grad_(name == "lm_head.weight")  # the head alone, whose gradient needs none of them
    model.checkpointing = True  # dipo.py's --grad-checkpointing: torch.utils.checkpoint per block
    logp = dipo.token_logprobs(model, batch, model.device, dtype)  # [4], the replayed rounds
    by_index = {t: lp for t, lp in zip(batch[2]["index"].tolist(), logp.tolist())}
    recorded = torch.tensor(result["logprobs"])
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(torch.tensor([by_index[t] for t in range(4)]), recorded, atol=tol, rtol=0)
    loss = dipo.dipo_token_loss(logp, logp.detach(), torch.ones_like(logp), 0.2, 0.28)[0].mean()
    loss.backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and (name not in before or not torch.equal(p, before[name])), name


def test_no_stage_imports_transformers_or_dynamo():
    """The stages' start-up: every stage script, the tiny model, one forward, and transformers
    never imported (it is the tests' oracle only); then one process's optimizer step and save
    import neither torch._dynamo (torch.optim's optimizers do) nor torch.distributed.checkpoint
    (2-3 s together on 2 cores)."""
    code = (
        "import sys, torch, attention, sft, rollout, dipo, eval, support.model, support.distributed\n"
        "model, tok = support.model.load_model('tiny')\n"
        "layout = attention.make_layout([[(8, 1, 4)]], 4)\n"
        "attention.forward_layout(model, torch.zeros(1, 12, dtype=torch.long), layout).sum().backward()\n"
        "optimizer = support.distributed.make_optimizer(model, 1e-3, 0.0, False, 1, torch.float32)\n"
        "optimizer.step()\n"
        "support.distributed.full_state(model, optimizer)\n"
        "heavy = ('transformers', 'torch._dynamo', 'torch.distributed.checkpoint')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout[-2000:] + out.stderr[-2000:]
