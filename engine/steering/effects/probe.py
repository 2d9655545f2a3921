"""Teacher-forced steering effects in one model: next-token distributions on neutral prompts,
the KL a steering vector causes, the coefficient that reaches a KL budget (iso-KL), and the
change of any string's log-probability under steering.

Nothing is generated: every number is one forward pass over fixed prompts, so it is
deterministic (on the same machine and thread count) and costs milliseconds per prompt.
Prompts are plain text (no chat template), the same for both models, so a string's
log-probability after a prompt means the same in both. The vector is added at the output of
block `layer` at every position, as steering does (`engine.steering.steer.steering`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import ConfigError
from engine.models.capture import capture_residual
from engine.models.loading import LoadedModel
from engine.steering.steer import steering

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


@dataclass
class Probe:
    """One model and its steering layer over a fixed set of prompts."""

    loaded: LoadedModel
    layer: int
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    _ids: list[list[int]] = field(init=False, repr=False)
    _base: torch.Tensor | None = field(default=None, init=False, repr=False)
    _strings: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _scale: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("the effect measure needs at least one prompt")
        tok = self.loaded.tokenizer
        # Each tokenizer adds what it adds to any text (Gemma its <bos>, SmolLM2 nothing).
        self._ids = [tok.encode(p) for p in self.prompts]

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
        positions = [[len(ids) - 1] for ids in self._ids]
        return self._logprobs(self._ids, positions, direction, coef, None)[0]

    def kl(self, direction: torch.Tensor, coef: float) -> float:
        """Mean over prompts of KL(steered || unsteered) of the next token, in nats."""
        steered = self.next_token(direction, coef)
        return float((steered.exp() * (steered - self.base)).sum(-1).mean())

    def iso_kl(
        self, direction: torch.Tensor, budget: float, steps: int = 14
    ) -> tuple[float, float, bool]:
        """The coefficient (raw units, along the unit `direction`) at which the KL reaches
        `budget`, by bisection on its logarithm between 1e-3 and 8 x the residual's median
        norm; with the KL there and whether the budget was reached at all."""
        lo, hi = math.log(1e-3 * self.scale), math.log(8.0 * self.scale)
        top = self.kl(direction, math.exp(hi))
        if top < budget:  # even 8x the typical norm moves the distribution less
            return math.exp(hi), top, False
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            if self.kl(direction, math.exp(mid)) < budget:
                lo = mid
            else:
                hi = mid
        coef = math.exp(0.5 * (lo + hi))
        return coef, self.kl(direction, coef), True

    # -- strings ---------------------------------------------------------------------------

    def string_ids(self, text: str) -> list[int]:
        """`text` in this model's tokenizer (no special tokens)."""
        return self.loaded.tokenizer.encode(text, add_special_tokens=False)

    def string_logprobs(
        self, strings: Sequence[str], direction: torch.Tensor | None = None, coef: float = 0.0
    ) -> torch.Tensor:
        """Each string's log-probability as the continuation of each prompt, averaged over
        the prompts [strings]; unsteered values are cached."""
        steered = direction is not None and coef != 0.0
        todo = [s for s in strings if steered or s not in self._strings]
        values: dict[str, float] = {}
        if todo:
            rows, positions, targets = [], [], []
            for s in todo:
                tail = self.string_ids(s)
                for ids in self._ids:
                    rows.append(ids + tail)
                    positions.append(list(range(len(ids) - 1, len(ids) + len(tail) - 1)))
                    targets.append(tail)
            sums = self._logprobs(rows, positions, direction, coef, targets)[1]
            n = len(self._ids)
            for i, s in enumerate(todo):
                values[s] = float(sums[i * n : (i + 1) * n].mean())
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
        coef: float,
        targets: list[list[int]] | None,
        batch: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax at `positions` of each row: the full distributions when `targets` is
        None ([rows, vocab], one position per row), else the summed log-probability of each
        row's targets [rows]."""
        full, sums = [], []
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            hidden = self._hidden(part, direction, coef)
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
        self, rows: list[list[int]], direction: torch.Tensor | None, coef: float
    ) -> torch.Tensor:
        """The final hidden states (after the last norm) of right-padded rows."""
        model = self.loaded.model
        width = max(len(r) for r in rows)
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        device = self.loaded.device
        body = getattr(model, "model", None)
        ctx = _nothing()
        if direction is not None and coef != 0.0:
            delta = (coef * direction.float() / direction.float().norm()).to(device)
            ctx = steering(model, self.layer, delta[None, :].expand(len(rows), -1))
        with torch.inference_mode(), ctx:
            out = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        return out.last_hidden_state.float()

    def _log_softmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary of final hidden states [n, vocab]."""
        model = self.loaded.model
        with torch.inference_mode():
            logits = model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)


def _split(targets: list[list[int]], start: int, part: list) -> list[torch.Tensor]:
    """The targets of rows start.. as index columns, cut into CHUNK-position pieces that
    line up with the log-softmax chunks."""
    flat = [t for i in range(len(part)) for t in targets[start + i]]
    col = torch.tensor(flat, dtype=torch.long)[:, None]
    return [col[k : k + CHUNK] for k in range(0, len(col), CHUNK)]


def _tensor(rows: list[list[int]], loaded: LoadedModel) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=loaded.device)


class _nothing:
    """A context manager that does nothing (torch's inference_mode cannot nest a None)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
