"""Response as LMDeploy's messages.py defines it, plus DiRL's step_map (unless
FAKE_LMDEPLOY_STEP_MAP=0: a stock build)."""

import os
from dataclasses import make_dataclass, field

_fields = [("text", str), ("generate_token_len", int), ("input_token_len", int),
           ("finish_reason", str, field(default=None)), ("token_ids", list, field(default_factory=list)),
           ("logprobs", list, field(default=None))]
if os.environ.get("FAKE_LMDEPLOY_STEP_MAP", "1") == "1":
    _fields.append(("step_map", list, field(default=None)))
Response = make_dataclass("Response", _fields)
