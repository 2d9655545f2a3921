"""Explainer and judge backed by Anthropic's Messages API, with the paper's prompts.

Requests put the fixed system prompt and few-shot turns first, marked for prompt caching,
so only each feature's examples are new input. Transient failures (429, 529 overloaded,
other 5xx, dropped connections) are retried with exponential backoff on top of the SDK's
own retries. A malformed answer is asked for once more with the same request, then
recorded unparsed with its raw text. Bulk work can go through the Message Batches API at
half price; submitted batches are written to a ledger file so an interrupted run collects
them instead of paying for them twice.

The package: `client` (the SDK, the retrying caller, prompt caching, prices and the cost
estimate), `explainer` (the explanation-and-flagging prompt), `batch` (the Message Batches
run and its ledger) and `judge` (detection judging).
"""
