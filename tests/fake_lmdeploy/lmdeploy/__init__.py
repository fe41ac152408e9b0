"""A stand-in for a step_map-returning LMDeploy build (DiRL's patched 0.10.1), so that the
CPU tests can drive `rollout.py --engine lmdeploy` end to end. It samples with our own
rollout.generate and answers in LMDeploy's layout: `Response.token_ids` end at the stop
token (LMDeploy's set_stop_pos), `step_map` is one counter per sequence that grows on every
iteration that unmasks something, across blocks, and `logprobs` are {token id: logprob}
dicts. FAKE_LMDEPLOY_LOGPROBS=0 leaves logprobs out; FAKE_LMDEPLOY_STEP_MAP=0 (read by
messages.py) is a stock build without step maps."""

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .messages import Response

__version__ = "0.0+fake"


@dataclass
class GenerationConfig:
    do_sample: bool = False
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 512
    logprobs: int = None
    random_seed: int = None
    min_new_tokens: int = None
    bad_token_ids: list = None


@dataclass
class PytorchEngineConfig:
    dtype: str = "auto"
    tp: int = 1
    dllm_block_length: int = None
    dllm_unmasking_strategy: str = None
    dllm_denoising_steps: int = None
    dllm_confidence_threshold: float = 0.9


class pipeline:
    def __init__(self, path, backend_config):
        import json
        from pathlib import Path

        import support.model

        assert json.loads((Path(path) / "config.json").read_text())["architectures"] == ["SDARForCausalLM"]
        self.model, self.tokenizer = support.model.load_model(path)
        self.engine = backend_config
        assert backend_config.dllm_block_length == self.model.config.block_size

    def __call__(self, texts, gen_config, do_preprocess=True):
        import support.model
        import rollout

        assert not do_preprocess
        e = self.engine
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.token_id(support.model.IM_END)}
        responses = []
        for text, g in zip(texts, gen_config):
            if e.dllm_unmasking_strategy == "sequential":
                assert e.dllm_denoising_steps == e.dllm_block_length  # ours commits one token per step
            cfg = SimpleNamespace(strategy=e.dllm_unmasking_strategy, threshold=e.dllm_confidence_threshold,
                                  denoising_steps=e.dllm_denoising_steps, temperature=g.temperature if g.do_sample else 0.0,
                                  top_k=g.top_k, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                                  ban_eos=self.tokenizer.eos_token_id in (g.bad_token_ids or []),
                                  min_new_tokens=g.min_new_tokens or 0)
            ids = self.tokenizer.encode([text])[0]
            res = rollout.generate(self.model, [ids], [torch.Generator().manual_seed(g.random_seed)], cfg, stop_ids)[0]
            b, counter, step_map, last_block = e.dllm_block_length, 0, [], None
            for t, local in enumerate(res["step_map"]):
                block = (len(ids) + t) // b
                if block != last_block:  # the counter goes on from the previous block's last step
                    counter += 0 if last_block is None else 1 + max(
                        s for u, s in enumerate(res["step_map"]) if (len(ids) + u) // b == last_block)
                    last_block = block
                step_map.append(counter + local + 1)
            end = rollout.stop_index(res["response_ids"], stop_ids)
            end = min(end + 1, len(res["response_ids"]))  # through the stop token, nothing after it
            tokens = res["response_ids"][:end]
            logprobs = None
            if os.environ.get("FAKE_LMDEPLOY_LOGPROBS", "1") == "1":
                logprobs = [{tok: lp, (tok + 1) % self.model.config.vocab_size: -9.0}
                            for tok, lp in zip(tokens, res["logprobs"][:end])]
            responses.append(Response(text=self.tokenizer.decode(tokens), generate_token_len=len(tokens),
                                      input_token_len=len(ids), finish_reason=res["finish"], token_ids=tokens,
                                      logprobs=logprobs, step_map=step_map[:end]))
        return responses

    def close(self):
        pass
