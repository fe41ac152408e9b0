"""The model and its text format: DiRL's chat format, the tiny built-in model with its
character tokenizer, and loading and saving checkpoints. Used by every stage; `python attention.py --model DIR [--save OUT]` runs its command line.

`load_model("tiny")` builds the small Qwen3 + character tokenizer used on CPU;
`load_model(dir)` opens a checkpoint this project wrote or an SDAR checkpoint (model_type
"sdar", Qwen3 weights) as a plain Qwen3ForCausalLM, without trust_remote_code. The block
size and the mask token id live in the model's config.json (`block_size`, `mask_token_id`)
and nowhere else.
"""

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from attention import BACKENDS, backend_of
from support.flags import flag, parse_config

EOS_TOKEN = "<|endoftext|>"  # also the padding token, as in SDAR
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MASK_TOKEN_NAMES = ("<|MASK|>", "<MASK>")  # SDAR's name; one file of its release uses the second
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, MASK_TOKEN_NAMES[0]]
DEFAULT_BLOCK_SIZE = 4
DIRL_INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."
TINY_INSTRUCTION = ""  # every character is a token for the tiny tokenizer, and the task always boxes
transformers.utils.logging.disable_progress_bar()  # a bar per load or save would bury the stages' own bars
transformers.utils.logging.set_verbosity_error()  # its load report: open_checkpoint refuses what it reports


# ----------------------------------------------------------------------------- the text format


def render_chat(messages, add_generation_prompt=False):
    """DiRL's one text format (ChatML without system prompt or think tags)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def render_prompt(question, instruction):
    """A question as the user turn, the instruction sentence appended, ready for the answer."""
    content = f"{question}\n{instruction}" if instruction else question
    return render_chat([{"role": "user", "content": content}], add_generation_prompt=True)


CHAT_TEMPLATE = (  # the same format as render_chat, for tools that call apply_chat_template
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- the tiny model


@dataclass
class TinyConfig:
    """The built-in model: Qwen3-shaped, about 1M parameters, sized for 2 CPU cores."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0


def build_char_tokenizer():
    """Character-level tokenizer: the 4 special tokens, then every printable ASCII character and
    newline. Any other character becomes <|endoftext|>; the built-in task uses none."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(seed=0, tiny=None):
    tokenizer = build_char_tokenizer()
    tiny = tiny or TinyConfig()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,  # as SDAR
        block_size=DEFAULT_BLOCK_SIZE,
        instruction=TINY_INSTRUCTION,
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN_NAMES[0]),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dataclasses.asdict(tiny),
    )
    with torch.random.fork_rng():  # the init must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model, tokenizer


# ----------------------------------------------------------------------------- checkpoints


def mask_token_id_of(tokenizer):
    for name in MASK_TOKEN_NAMES:
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    return None


def checkpoint_config(path):
    """The Qwen3Config of a checkpoint dir (ours, or SDAR's with its custom-code keys dropped),
    with `mask_token_id`, `block_size` and `instruction` always set, and its tokenizer."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: not a JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path / 'config.json'}: not a JSON object")
    if raw.get("model_type") == "sdar":
        drop = ("model_type", "architectures", "auto_map", "transformers_version")
        config = Qwen3Config(**{k: v for k, v in raw.items() if k not in drop})
    elif raw.get("model_type") == "qwen3":
        config = Qwen3Config.from_pretrained(path)
    else:
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is neither 'sdar' nor 'qwen3'")
    if getattr(config, "use_sliding_window", False):
        raise ValueError(f"{path}: sliding-window attention is not part of the block-diffusion rule")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mask_id = mask_token_id_of(tokenizer)
    if mask_id is None:
        raise ValueError(
            f"{path}: the tokenizer has no mask token (looked for {', '.join(MASK_TOKEN_NAMES)})"
        )
    if getattr(config, "mask_token_id", None) not in (None, mask_id):
        raise ValueError(
            f"{path}: config mask_token_id {config.mask_token_id} differs from the tokenizer's "
            f"mask token id {mask_id}"
        )
    config.mask_token_id = mask_id
    config.block_size = getattr(config, "block_size", None) or DEFAULT_BLOCK_SIZE  # some SDAR copies omit it
    if type(config.block_size) is not int or not 0 < config.block_size <= config.max_position_embeddings:
        raise ValueError(
            f"{path / 'config.json'}: block_size {config.block_size!r} is not a positive integer"
        )
    if not 0 <= mask_id < config.vocab_size:
        raise ValueError(
            f"{path}: the mask token id {mask_id} is outside the vocabulary ({config.vocab_size})"
        )
    config.instruction = getattr(config, "instruction", DIRL_INSTRUCTION)
    return config, tokenizer


def load_model(name_or_dir, dtype=torch.float32, device="cpu", attn="auto", seed=0):
    """Load (model, tokenizer) from "tiny", a checkpoint of this project, or an SDAR dir.
    The model's config always carries `block_size`, `mask_token_id` and `instruction`
    (the sentence appended to questions, DiRL's unless the checkpoint says otherwise) afterwards."""
    if attn == "auto":
        attn = "flex" if torch.device(device).type == "cuda" else "sdpa"
    if attn not in BACKENDS:
        raise ValueError(f"unknown attention backend {attn!r}; choose from {sorted(BACKENDS)} or 'auto'")
    if name_or_dir == "tiny":
        model, tokenizer = build_tiny(seed)
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a model directory (no config.json); pass a checkpoint dir or 'tiny'"
            )
        model, tokenizer = open_checkpoint(path, dtype)
    model.set_attn_implementation(BACKENDS[attn])
    model.to(device=device, dtype=dtype)
    for name, weight in model.named_parameters():  # on the device, in the dtype the stage computes in
        if not torch.isfinite(weight).all():  # one NaN would reach every logit, record and update
            raise ValueError(f"{name_or_dir}: weight {name} holds non-finite values")
    return model, tokenizer


def open_checkpoint(path, dtype):
    """(model, tokenizer) of a checkpoint dir whose weights are checked before any work: every
    safetensors file readable, the embedding of the shape config.json says, no weight missing
    or unknown (load_model then checks that every weight is finite). A failure is one
    ValueError naming the file."""
    config, tokenizer = checkpoint_config(path)
    embedding = (config.vocab_size, config.hidden_size)
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as weights:
                shape = None
                if "model.embed_tokens.weight" in weights.keys():
                    shape = tuple(weights.get_slice("model.embed_tokens.weight").get_shape())
        except Exception as e:  # a truncated or foreign file: safetensors raises its own kind
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        if shape is not None and shape != embedding:
            raise ValueError(f"{path}: config.json says embeddings {embedding}, the weights {shape}")
    try:
        model, info = Qwen3ForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError) as e:  # mis-shaped weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the weights do not load with its config.json ({first})") from None
    for kind in (
        "missing_keys",
        "unexpected_keys",
    ):  # transformers would initialise a missing weight at random
        if info[kind]:
            names = sorted(info[kind])
            raise ValueError(
                f"{path}: weights {kind.split('_')[0]}: {', '.join(names[:3])} ({len(names)} in all)"
            )
    return model, tokenizer


def save_checkpoint(model, tokenizer, out_dir, state_dict=None, trainer_state=None):
    """Write an HF model dir (config.json, model.safetensors, tokenizer files) atomically:
    into a temporary sibling first, then os.replace, so `out_dir` is always whole or absent.
    state_dict: the full weights when the model is sharded; trainer_state: saved beside them
    as trainer_state.pt, so weights and optimizer state can never come from different steps."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # refused before the temporary copy exists: nothing is left behind
        raise ValueError(f"{out_dir}: a symlink; a checkpoint is written as a directory of its own")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # a plain from_pretrained must not need our registry
    try:  # save_pretrained empties the dict it is given, hence the copy
        model.save_pretrained(tmp, state_dict=dict(state_dict) if state_dict is not None else None)
        tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    except (OSError, SafetensorError) as e:  # a full disk, a size limit: no half-written copy stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            getattr(e, "errno", None), getattr(e, "strerror", None) or str(e), str(out_dir)
        ) from None
    finally:
        model.config._attn_implementation = attn
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- command line


@dataclass
class Config:
    model: str = flag("tiny", "'tiny' or a model dir (a checkpoint of this project or an SDAR checkpoint)")
    save: str = flag("", "if set, write the loaded model here as a checkpoint of this project")
    attn: str = flag("auto", "attention backend: auto (flex on CUDA, else sdpa), flex, sdpa or eager")
    seed: int = flag(0, "initialisation seed of the tiny model")


def main(argv=None):
    """Print what a model dir holds; --save writes it as a checkpoint of this project."""
    try:
        cfg = parse_config(
            Config, argv, description="attention.py: load a model, print it, optionally save it"
        )
        model, tokenizer = load_model(cfg.model, attn=cfg.attn, seed=cfg.seed)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    c, params = model.config, sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.model}: Qwen3 {params / 1e6:.2f}M params, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"vocab {c.vocab_size}, block_size {c.block_size}, mask_token_id {c.mask_token_id}, attn {backend_of(model)}"
    )
    if cfg.save:
        save_checkpoint(model, tokenizer, cfg.save)
        print(f"saved to {cfg.save}")
