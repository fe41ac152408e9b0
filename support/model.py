"""The model and its text format: DiRL's chat format, the tiny built-in model with its
character tokenizer, and loading and saving checkpoints. Used by every stage; `python attention.py --model DIR [--save OUT]` runs its command line.

`load_model("tiny")` builds the small Qwen3 + character tokenizer used on CPU;
`load_model(dir)` opens a checkpoint this project wrote or an SDAR checkpoint (model_type
"sdar", Qwen3 weights) as our Qwen3 (support/qwen3.py), and its tokenizer.json with the
`tokenizers` library: no transformers at run time. The block size and the mask token id
live in the model's config.json (`block_size`, `mask_token_id`) and nowhere else.
"""

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from attention import BACKENDS
from support.flags import flag, parse_config
from support.qwen3 import Qwen3Config, Qwen3ForCausalLM, config_from_dict, config_to_dict

EOS_TOKEN = "<|endoftext|>"  # also the padding token, as in SDAR
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MASK_TOKEN_NAMES = ("<|MASK|>", "<MASK>")  # SDAR's name; one file of its release uses the second
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, MASK_TOKEN_NAMES[0]]
DEFAULT_BLOCK_SIZE = 4
DIRL_INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."
TINY_INSTRUCTION = ""  # every character is a token for the tiny tokenizer, and the task always boxes


# ----------------------------------------------------------------------------- the text format


def render_chat(messages, add_generation_prompt=False):
    """DiRL's one text format (ChatML without system prompt or think tags)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def render_prompt(question, instruction):
    """A question as the user turn, the instruction sentence appended, ready for the answer."""
    content = f"{question}\n{instruction}" if instruction else question
    return render_chat([{"role": "user", "content": content}], add_generation_prompt=True)


def sft_record_texts(record, instruction):
    """An SFT record's (prompt text, response text) in DiRL's chat format; the response ends with
    <|im_end|>\n. A record is {"messages": [..., assistant turn]} or {"prompt", "response"}."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        last = messages[-1]
        if (
            not isinstance(last, dict)
            or last.get("role") != "assistant"
            or not isinstance(last.get("content"), str)
        ):
            raise ValueError("the last message must be an assistant turn with string content")
        prompt = render_chat(messages[:-1], add_generation_prompt=True)
        return prompt, last["content"] + IM_END + "\n"
    if (
        isinstance(record, dict)
        and isinstance(record.get("prompt"), str)
        and isinstance(record.get("response"), str)
    ):
        return render_prompt(record["prompt"], instruction), record["response"] + IM_END + "\n"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"need 'messages' or 'prompt' + 'response' (have {keys})")


CHAT_TEMPLATE = (  # the same format as render_chat, for tools that call apply_chat_template
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TextTokenizer:
    """A tokenizer.json (the `tokenizers` library) with the few calls the stages make, and the
    tokenizer_config.json beside it, kept as it came so that a saved checkpoint keeps it."""

    def __init__(self, backend, settings):
        self.backend, self.settings = backend, settings
        eos = settings.get("eos_token") or EOS_TOKEN
        eos = eos.get("content") if isinstance(eos, dict) else eos  # an AddedToken written out
        self.eos_token_id = backend.token_to_id(eos) if isinstance(eos, str) else None
        if self.eos_token_id is None:
            raise ValueError(f"the end-of-text token {eos!r} is not in the vocabulary")

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        """The id of one token (a special token's name), or None when the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def encode(self, texts):
        """A list of texts -> a list of token id lists; no special tokens are added."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir):
        self.backend.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.settings, indent=2) + "\n")

    @classmethod
    def load(cls, path):
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json (the tokenizer is read from that file alone)")
        try:
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own kind
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizer ({e})") from None
        settings = (
            read_json_object(path / "tokenizer_config.json")
            if (path / "tokenizer_config.json").is_file()
            else {}
        )
        try:
            return cls(backend, settings)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


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
    from tokenizers import Regex, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    return TextTokenizer(backend, {**settings, "chat_template": CHAT_TEMPLATE})


def build_tiny(seed=0, tiny=None):
    tokenizer = build_char_tokenizer()
    tiny = tiny or TinyConfig()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,  # as SDAR
        block_size=DEFAULT_BLOCK_SIZE,
        instruction=TINY_INSTRUCTION,
        mask_token_id=tokenizer.token_id(MASK_TOKEN_NAMES[0]),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **dataclasses.asdict(tiny),
    )
    with torch.random.fork_rng():  # the init must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model, tokenizer


# ----------------------------------------------------------------------------- checkpoints


def read_json_object(file):
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: not a JSON object")
    return raw


def mask_token_id_of(tokenizer):
    ids = [tokenizer.token_id(name) for name in MASK_TOKEN_NAMES]
    return next((i for i in ids if i is not None), None)


def checkpoint_config(path):
    """The Qwen3Config of a checkpoint dir (ours, or SDAR's with its custom-code keys dropped),
    with `mask_token_id`, `block_size` and `instruction` always set, and its tokenizer."""
    raw = read_json_object(path / "config.json")
    if raw.get("model_type") not in ("sdar", "qwen3"):
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is neither 'sdar' nor 'qwen3'")
    try:
        config = config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    tokenizer = TextTokenizer.load(path)
    mask_id = mask_token_id_of(tokenizer)
    if mask_id is None:
        raise ValueError(
            f"{path}: the tokenizer has no mask token (looked for {', '.join(MASK_TOKEN_NAMES)})"
        )
    if config.mask_token_id not in (None, mask_id):
        raise ValueError(
            f"{path}: config mask_token_id {config.mask_token_id} differs from the tokenizer's "
            f"mask token id {mask_id}"
        )
    config.mask_token_id = mask_id
    config.block_size = config.block_size or DEFAULT_BLOCK_SIZE  # some SDAR copies omit it
    if type(config.block_size) is not int or not 0 < config.block_size <= config.max_position_embeddings:
        raise ValueError(
            f"{path / 'config.json'}: block_size {config.block_size!r} is not a positive integer"
        )
    if not 0 <= mask_id < config.vocab_size:
        raise ValueError(
            f"{path}: the mask token id {mask_id} is outside the vocabulary ({config.vocab_size})"
        )
    config.instruction = DIRL_INSTRUCTION if config.instruction is None else config.instruction
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
        model, tokenizer = open_checkpoint(path)
    model.attn = attn
    model.to(device=device, dtype=dtype)
    for name, weight in model.named_parameters():  # on the device, in the dtype the stage computes in
        if not torch.isfinite(weight).all():  # one NaN would reach every logit, record and update
            raise ValueError(f"{name_or_dir}: weight {name} holds non-finite values")
    return model, tokenizer


def open_checkpoint(path):
    """(model, tokenizer) of a checkpoint dir whose weights are checked before any work: every
    safetensors file readable, every weight of the shape config.json says, none missing or
    unknown (load_model then checks that every weight is finite). A failure is one ValueError
    naming the file. The model is built on the meta device and takes the file's tensors."""
    config, tokenizer = checkpoint_config(path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    expected = {name: p.shape for name, p in model.named_parameters()}  # a tied head is listed once
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                weights.update({name: f.get_tensor(name) for name in f.keys()})
        except Exception as e:  # a truncated or foreign file: safetensors raises its own kind
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints store the head as well
    for kind, names in (("missing", expected.keys() - weights), ("unexpected", weights.keys() - expected)):
        if names:
            raise ValueError(f"{path}: weights {kind}: {', '.join(sorted(names)[:3])} ({len(names)} in all)")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ValueError(
                f"{path}: the weights do not load with its config.json "
                f"({name} is {tuple(weights[name].shape)}, the config says {tuple(shape)})"
            )
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
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
    state = model.state_dict() if state_dict is None else state_dict
    tied = model.config.tie_word_embeddings
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")
    }
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = config_to_dict(model.config, model.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    except (OSError, SafetensorError) as e:  # a full disk, a size limit: no half-written copy stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            getattr(e, "errno", None), getattr(e, "strerror", None) or str(e), str(out_dir)
        ) from None
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
        f"vocab {c.vocab_size}, block_size {c.block_size}, mask_token_id {c.mask_token_id}, attn {model.attn}"
    )
    if cfg.save:
        save_checkpoint(model, tokenizer, cfg.save)
        print(f"saved to {cfg.save}")
