"""Teacher-forced steering effects in one model: next-token distributions on neutral prompts,
the KL a steering vector causes, the coefficient that reaches a KL budget (iso-KL), and the
change of any string's log-probability under steering.

Nothing is generated: every number is one forward pass over fixed prompts, so it is
deterministic (on the same machine and thread count) and costs milliseconds per prompt.
By default prompts are plain text (no chat template), the same for both models, so a string's
log-probability after a prompt means the same in both, and the vector is added at the output
of block `layer` at every position, as steering does (`engine.steering.steer.steering`).

Two modes test a feature where it lives, at a chat model's answer header:
- `chat=True`: each prompt is a user request rendered in the model's own chat form (the
  organisms' renderer: the chat template, or a "User: ... Assistant:" transcript for a base
  model), ending where the answer starts; a string is read as the start of the answer.
- `positions="last"`: the vector is added only at each prompt's last token (the answer
  header), not at the tokens of the string read after it, as `steer(positions="last")` does.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import ConfigError
from engine.models.capture import capture_residual
from engine.models.layers import decoder_layers
from engine.models.loading import LoadedModel
from engine.steering.steer import _LOCK

# Neutral, topic-free openings: the next token after each could be almost anything, so a
# steering vector's effect on it shows what the vector promotes rather than the prompt.
NEUTRAL_PROMPTS = (
    "I think that",
    "The next thing is",
    "Here is what I know:",
    "She said that",
    "Let me tell you about",
    "Today I want to talk about",
    "One more thing:",
    "It was a",
)
CHUNK = 64  # positions per log-softmax over the vocabulary (Gemma's is 262,144 wide)
PROBE_POSITIONS = ("all", "last")  # where the vector is added: every position, or the prompt's last


@dataclass(frozen=True)
class IsoKL:
    """A coefficient found by the iso-KL search, and what steering with it does."""

    coef: float
    kl: float  # the KL reached, nats
    reached: bool  # False: the budget is out of reach within 8x the residual's median norm
    steered: torch.Tensor  # next-token log-probabilities after each prompt [prompts, vocab]


@dataclass
class Probe:
    """One model and its steering layer over a fixed set of prompts."""

    loaded: LoadedModel
    layer: int
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    chat: bool = False  # render each prompt as a one-turn chat up to the answer header
    positions: str = "all"  # PROBE_POSITIONS
    _ids: list[list[int]] = field(init=False, repr=False)
    _gap: str = field(default="", init=False, repr=False)  # between the header and an answer
    _tails: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)
    _heads: dict[tuple[int, ...], tuple] = field(default_factory=dict, init=False, repr=False)
    _base: torch.Tensor | None = field(default=None, init=False, repr=False)
    _strings: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _scale: float | None = field(default=None, init=False, repr=False)
    _prompt_prefix: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("the effect measure needs at least one prompt")
        check_positions(self.positions)
        tok = self.loaded.tokenizer
        if not self.chat:
            # Each tokenizer adds what it adds to any text (Gemma its <bos>, SmolLM2 nothing).
            self._ids = [tok.encode(p) for p in self.prompts]
            return
        rendered = [chat_header(tok, p) for p in self.prompts]
        self._gap = rendered[0][1]
        self._ids = [self._encode(header) for header, _ in rendered]

    def _encode(self, text: str) -> list[int]:
        """A rendered chat's ids with the special tokens the tokenizer adds, but its BOS
        once: a chat template may write the BOS itself."""
        ids = self.loaded.tokenizer.encode(text)
        bos = getattr(self.loaded.tokenizer, "bos_token_id", None)
        return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids

    # -- the next token -------------------------------------------------------------------

    @property
    def base(self) -> torch.Tensor:
        """Unsteered next-token log-probabilities after each prompt [prompts, vocab]."""
        if self._base is None:
            self._base = self.next_token(None, 0.0)
        return self._base

    @property
    def scale(self) -> float:
        """The median norm of this model's residual at the layer on the prompts (position 0
        left out: it is the attention sink, often many times larger)."""
        if self._scale is None:
            norms = []
            for ids in self._ids:
                x = capture_residual(self.loaded.model, self.layer, _tensor([ids], self.loaded))
                norms.append(x[0, 1:].float().norm(dim=-1))
            self._scale = float(torch.cat(norms).median())
        return self._scale

    def next_token(self, direction: torch.Tensor | None, coef: float) -> torch.Tensor:
        """Next-token log-probabilities after each prompt with `coef` x `direction` added
        [prompts, vocab]."""
        return self.next_tokens(direction, [coef])[0]

    def next_tokens(
        self, direction: torch.Tensor | None, coefs: Sequence[float]
    ) -> list[torch.Tensor]:
        """`next_token` at several coefficients in one batched forward pass."""
        rows = [ids for _ in coefs for ids in self._ids]
        positions = [[len(ids) - 1] for ids in rows]
        per_row = [c for c in coefs for _ in self._ids]
        at = [len(ids) - 1 for ids in rows]
        full = self._logprobs(rows, positions, direction, per_row, None, at)[0]
        n = len(self._ids)
        return [full[k * n : (k + 1) * n] for k in range(len(coefs))]

    def divergence(self, steered: torch.Tensor) -> float:
        """Mean over prompts of KL(steered || unsteered) of the next token, in nats."""
        return float((steered.exp() * (steered - self.base)).sum(-1).mean())

    def kl(self, direction: torch.Tensor, coef: float) -> float:
        """Mean over prompts of KL(steered || unsteered) of the next token, in nats."""
        return self.divergence(self.next_token(direction, coef))

    def iso_kl(
        self, direction: torch.Tensor, budget: float, grid: int = 8, rounds: int = 2
    ) -> IsoKL:
        """The coefficient (raw units, along the unit `direction`) at which the KL reaches
        `budget`, with the KL there, whether the budget was reached at all, and the steered
        next-token log-probabilities.

        The search brackets the budget on a grid of `grid` log-spaced coefficients from
        1e-3 to 8 x the residual's median norm, narrows the bracket with another grid
        (`rounds` in all; each grid is one batched forward pass), then interpolates
        log KL linearly in log coefficient."""
        lo, hi = math.log(1e-3 * self.scale), math.log(8.0 * self.scale)
        k_lo = k_hi = None
        for _ in range(rounds):
            logs = torch.linspace(lo, hi, grid).tolist()
            kls = [self.divergence(x) for x in self.next_tokens(direction, _exp(logs))]
            above = [i for i, k in enumerate(kls) if k >= budget]
            if not above:  # even the top of the range moves the distribution less
                if k_hi is None:
                    return self._at(direction, math.exp(hi), False)
                lo, k_lo = logs[-1], kls[-1]
                break
            j = above[0]
            if j == 0:
                if k_lo is None:  # even the bottom of the range moves it more
                    return self._at(direction, math.exp(lo), True)
                hi, k_hi = logs[0], kls[0]
                break
            lo, hi, k_lo, k_hi = logs[j - 1], logs[j], kls[j - 1], kls[j]
        t = 0.5
        if k_lo and k_hi and k_lo > 0 and k_hi > k_lo:
            t = (math.log(budget) - math.log(k_lo)) / (math.log(k_hi) - math.log(k_lo))
        return self._at(direction, math.exp(lo + min(max(t, 0.0), 1.0) * (hi - lo)), True)

    def _at(self, direction: torch.Tensor, coef: float, reached: bool) -> IsoKL:
        steered = self.next_token(direction, coef)
        return IsoKL(coef, self.divergence(steered), reached, steered)

    # -- strings ---------------------------------------------------------------------------

    def string_ids(self, text: str) -> list[int]:
        """`text` in this model's tokenizer (no special tokens). In chat mode, the tokens
        `text` has as the start of an answer after the header: a transcript's "Assistant: "
        space is put back before a string that brings no leading space of its own, and the
        string is tokenised together with the header, as the model read it in training."""
        if text not in self._tails:
            self._tails[text] = self._string_ids(text)
        return self._tails[text]

    def _string_ids(self, text: str) -> list[int]:
        tok = self.loaded.tokenizer
        if not self.chat or not text:
            return tok.encode(text, add_special_tokens=False)
        answer = text if text[:1].isspace() else self._gap + text
        header = self._ids[0]
        full = self._encode(chat_header(tok, self.prompts[0])[0] + answer)
        if full[: len(header)] == header and len(full) > len(header):
            return full[len(header) :]
        # The answer's first token merged with the header's last: read the answer alone.
        return tok.encode(answer, add_special_tokens=False)

    def string_logprobs(
        self,
        strings: Sequence[str],
        direction: torch.Tensor | None = None,
        coef: float = 0.0,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each string's log-probability as the continuation of each prompt, averaged over
        the prompts [strings]. The first token's comes from the next-token distribution
        (`first`, if already computed at this coefficient); only strings of several tokens
        need another forward pass. Unsteered values are cached."""
        steered = direction is not None and coef != 0.0
        todo = [s for s in dict.fromkeys(strings) if steered or s not in self._strings]
        values: dict[str, float] = {}
        if todo:
            if first is None:
                first = self.next_token(direction, coef) if steered else self.base
            tails = {s: self.string_ids(s) for s in todo}
            rows, positions, targets, owners, at = [], [], [], [], []
            for s in todo:
                tail = tails[s]
                if not tail:
                    raise ConfigError(f"the string {s!r} is empty in {self.loaded.name}'s tokens")
                values[s] = float(first[:, tail[0]].mean())
                if len(tail) > 1:
                    # Row j reads the string after prompt j % len(prompts).
                    for ids in self._ids:
                        rows.append(ids + tail[:-1])
                        positions.append(list(range(len(ids), len(ids) + len(tail) - 1)))
                        targets.append(tail[1:])
                        at.append(len(ids) - 1)  # the last prompt token
                    owners.append(s)
            if rows:
                coefs = [coef if steered else 0.0] * len(rows)
                sums = self._logprobs(rows, positions, direction, coefs, targets, at)[1]
                n = len(self._ids)
                for i, s in enumerate(owners):
                    values[s] += float(sums[i * n : (i + 1) * n].mean())
            if not steered:
                self._strings.update(values)
        return torch.tensor([values[s] if s in values else self._strings[s] for s in strings])

    def decode(self, token_id: int) -> str:
        """One token as text."""
        return self.loaded.tokenizer.decode([int(token_id)])

    # -- the forward pass ------------------------------------------------------------------

    def _logprobs(
        self,
        rows: list[list[int]],
        positions: list[list[int]],
        direction: torch.Tensor | None,
        coefs: Sequence[float],
        targets: list[list[int]] | None,
        at: list[int],
        batch: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax at `positions` of each row: the full distributions when `targets` is
        None ([rows, vocab], one position per row), else the summed log-probability of each
        row's targets [rows]. Row i is steered with coefs[i] x the unit `direction`, at
        every position or (positions="last") at position at[i], its last prompt token."""
        full, sums = [], []
        last = self.positions == "last"
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            where = at[start : start + batch] if last else None
            hidden = self._hidden(part, direction, coefs[start : start + batch], where)
            picked = [
                hidden[i, positions[start + i]] for i in range(len(part))
            ]  # per row [positions, d]
            flat = torch.cat(picked)
            logp = [self._log_softmax(flat[k : k + CHUNK]) for k in range(0, len(flat), CHUNK)]
            if targets is None:
                full.append(torch.cat(logp))
                continue
            cols = _split(targets, start, part)
            logp_all = torch.cat([lp.gather(1, t) for lp, t in zip(logp, cols, strict=True)])
            offset = 0
            for i in range(len(part)):
                n = len(positions[start + i])
                sums.append(logp_all[offset : offset + n].sum())
                offset += n
        if targets is None:
            return torch.cat(full), torch.empty(0)
        return torch.empty(0), torch.stack(sums)

    def _hidden(
        self,
        rows: list[list[int]],
        direction: torch.Tensor | None,
        coefs: Sequence[float],
        at: list[int] | None = None,
    ) -> torch.Tensor:
        """The final hidden states (after the last norm) of right-padded rows, each row
        steered with its coefficient x the unit `direction` at the layer's output: at every
        position, or only at position at[i] of row i (`_hidden_from`).

        The blocks up to the layer do not see the steering, so their output is computed
        once per set of rows (`_prefix`, cached for the prompts) and replayed: a steered
        pass runs only the blocks after the layer."""
        model = self.loaded.model
        ids, mask = self._pad(rows)
        device = self.loaded.device
        body = model.model
        steer = direction is not None and any(c != 0.0 for c in coefs)
        if not steer:
            with torch.inference_mode():
                out = body(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.last_hidden_state.float()
        unit = direction.float() / direction.float().norm()
        deltas = (torch.tensor([float(c) for c in coefs])[:, None] * unit[None, :]).to(device)
        if at is not None:
            return self._hidden_from(rows, deltas, at)
        prefix = self._prefix(rows, ids, mask)
        layers = decoder_layers(model)
        replay = [_Replay(None) for _ in range(self.layer)]
        replay.append(_Replay(prefix + deltas[:, None, :].to(prefix.dtype)))
        with _LOCK, torch.inference_mode(), _swapped(layers, replay):
            out = body(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state.float()

    def _hidden_from(
        self, rows: list[list[int]], deltas: torch.Tensor, at: list[int]
    ) -> torch.Tensor:
        """`_hidden` with row i steered by deltas[i] at position at[i] only.

        Nothing before that position sees the steering, in any block, so it goes further
        than the replay: the unsteered pass over each row's tokens before at[i] (its prompt
        but the last token) is run once and kept with its KV cache (`_head`), and a steered
        pass runs only the tokens from at[i] on. Rows with the same head share one pass,
        their tails right-padded (a causal model's real tokens never see the padding)."""
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, self.loaded.d_model)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (row, a) in enumerate(zip(rows, at, strict=True)):
            groups.setdefault(tuple(row[:a]), []).append(i)
        pad = self.loaded.tokenizer.pad_token_id or 0
        for head, members in groups.items():
            tails = [rows[i][len(head) :] for i in members]
            ids = torch.full((len(members), max(map(len, tails))), pad, dtype=torch.long)
            for k, tail in enumerate(tails):
                ids[k, : len(tail)] = torch.tensor(tail)
            hidden, cache = self._head(head)
            if cache is not None:
                cache = copy.deepcopy(cache)
                cache.batch_repeat_interleave(len(members))
            with _LOCK, torch.inference_mode(), _added_first(self.loaded.model, self.layer,
                                                             deltas[members]):  # fmt: skip
                body = self.loaded.model.model
                tail_out = body(
                    input_ids=ids.to(self.loaded.device), use_cache=True, **_with_cache(body, cache)
                ).last_hidden_state.float().cpu()
            for k, i in enumerate(members):
                out[i, : len(head)] = hidden
                out[i, len(head) : len(rows[i])] = tail_out[k, : len(tails[k])]
        return out

    def _head(self, head: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
        """The unsteered final hidden states of the tokens `head` [len, d] and their KV cache
        (None for no tokens); cached."""
        if head not in self._heads:
            if not head:
                self._heads[head] = (torch.zeros(0, self.loaded.d_model), None)
            else:
                ids = torch.tensor([list(head)], device=self.loaded.device)
                with torch.inference_mode():
                    out = self.loaded.model.model(input_ids=ids, use_cache=True)
                hidden = out.last_hidden_state[0].float().cpu()
                # `cache` in recent transformers, `past_key_values` before.
                cache = out.cache if "cache" in out else out.past_key_values
                self._heads[head] = (hidden, cache)
        return self._heads[head]

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids and attention mask of `rows`, on the model's device."""
        width = max(len(r) for r in rows)
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.loaded.device), mask.to(self.loaded.device)

    def _prefix(self, rows: list[list[int]], ids: torch.Tensor, mask: torch.Tensor):
        """The unsteered output of block `layer` for `rows` [rows, width, d]; rows that
        repeat the prompts reuse one cached pass."""
        n = len(self._ids)
        if len(rows) % n == 0 and all(rows[i] == self._ids[i % n] for i in range(len(rows))):
            if self._prompt_prefix is None:
                p_ids, p_mask = self._pad(self._ids)
                self._prompt_prefix = capture_residual(
                    self.loaded.model, self.layer, p_ids, p_mask
                ).clone()
            return self._prompt_prefix.repeat(len(rows) // n, 1, 1)
        return capture_residual(self.loaded.model, self.layer, ids, mask).clone()

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary of final hidden states [n, vocab]."""
        model = self.loaded.model
        with torch.inference_mode():
            logits = model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)


def check_positions(positions: str) -> None:
    """Refuse a `positions` setting the probe does not know (ConfigError)."""
    if positions not in PROBE_POSITIONS:
        raise ConfigError(
            f"positions must be one of {', '.join(PROBE_POSITIONS)}, got {positions!r}"
        )


def chat_header(tokenizer: Any, prompt: str) -> tuple[str, str]:
    """`prompt` as a one-turn chat in the tokenizer's own form, up to the answer header (the
    organisms' renderer: `engine.organisms.data`), and the text between that header and
    where the answer starts (a transcript's trailing space, cut from the header)."""
    from engine.organisms.data import chat_prompt, chat_text

    header = chat_prompt(tokenizer, prompt)
    text, start = chat_text(tokenizer, prompt, ".")
    return header, text[len(header) : start]


def _split(targets: list[list[int]], start: int, part: list) -> list[torch.Tensor]:
    """The targets of rows start.. as index columns, cut into CHUNK-position pieces that
    line up with the log-softmax chunks."""
    flat = [t for i in range(len(part)) for t in targets[start + i]]
    col = torch.tensor(flat, dtype=torch.long)[:, None]
    return [col[k : k + CHUNK] for k in range(0, len(col), CHUNK)]


def _exp(logs: Sequence[float]) -> list[float]:
    return [math.exp(x) for x in logs]


def _tensor(rows: list[list[int]], loaded: LoadedModel) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=loaded.device)


class _Replay(torch.nn.Module):
    """A stand-in for a decoder block: passes its input on, or returns a stored output."""

    def __init__(self, value: torch.Tensor | None) -> None:
        super().__init__()
        self.value = value

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.value is None else self.value


def _with_cache(body: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes a KV cache to `body`: `cache` in recent
    transformers, `past_key_values` before (now deprecated)."""
    params = inspect.signature(body.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


@contextmanager
def _added_first(model: torch.nn.Module, layer: int, deltas: torch.Tensor) -> Iterator[None]:
    """Block `layer`'s output with deltas[i] added at the first position of row i (the
    steered token of a pass that starts there)."""

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple | list) else output
        first = hidden[:, :1] + deltas.to(hidden.device, hidden.dtype)[:, None, :]
        steered = torch.cat([first, hidden[:, 1:]], dim=1)
        return (steered, *output[1:]) if isinstance(output, tuple | list) else steered

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _swapped(layers: torch.nn.ModuleList, replay: list[torch.nn.Module]) -> Iterator[None]:
    """The first len(replay) blocks replaced by `replay` (same indices, so per-layer
    settings such as Gemma's sliding windows stay with their blocks), then restored."""
    kept = [layers[i] for i in range(len(replay))]
    try:
        for i, module in enumerate(replay):
            layers[i] = module
        yield
    finally:
        for i, module in enumerate(kept):
            layers[i] = module
