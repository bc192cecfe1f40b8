"""One step of the running batch: a prefill chunk for new rows, then one decode step for all.

Each row carries its own cache row, position, adapter slot, sampling parameters and generator,
so rows join and leave between any two steps. Long prompts are prefilled `prefill_chunk` tokens
per step (across all new rows) so that rows already decoding do not stall behind them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from adapters.merged_slot import SlotMerger
from adapters.routing import AdapterRouting
from backbone.model import CausalLM
from backbone.sampling import sample_next_tokens
from server.batch_state import CachePool, Row
from server.logprobs import TokenLogprob, prompt_logprobs_of_chunk, token_logprobs
from server.prefill_logits import prefill_logits
from server.prefill_order import prefill_groups
from server.prefix_kv import PrefixCache
from server.request_handle import Finished, TextDelta
from server.slot_copies import SlotCopier, host_to_device

log = logging.getLogger(__name__)

ROW_FAILED = "internal error in this request's sampling or decoding; the server log has the details"

# Right-padding id for prefill chunks of unequal length: a pad's key lands past the row's real
# tokens and is overwritten before any real query can see it (backbone/kv_cache.py).
PAD_TOKEN_ID = 0


class BatchRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: CachePool,
        stop_token_ids: set[int],
        prefill_chunk: int,
        on_finish: Callable[[Row, Finished], None],
        slot_copies: SlotCopier | None = None,
        prefix_cache: PrefixCache | None = None,
        merger: SlotMerger | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.stop_token_ids = stop_token_ids
        self.prefill_chunk = prefill_chunk
        self._on_finish = on_finish  # the engine's bookkeeping when a row leaves
        self._device = model.inv_freq.device
        self._slot_copies = slot_copies  # a batch waits for pending writes to the slots it reads
        self.prefix_cache = prefix_cache
        self.merger = merger  # merges an adapter that has had every row for a while

    def step(self, rows: list[Row]) -> None:
        """Advance every row by one step; finished rows are reported through `on_finish`."""
        with torch.inference_mode():
            self._prefill(rows)
            decoding = [row for row in rows if not row.prefilling and not row.handle.done]
            if decoding:
                self._decode(decoding)

    def finish(self, row: Row, reason: str, error: str | None = None) -> None:
        """End a row: send the held-back text (unless cancelled or failed), then Finished."""
        if row.ended:
            return  # released already: a failure after that must not release it twice
        if reason in ("stop", "length"):
            tail = row.stream.finish()
            if tail or row.unsent_ids or row.unsent_logprobs:
                row.handle.push(TextDelta(tail, row.unsent_ids, row.unsent_logprobs))
        row.unsent_ids, row.unsent_logprobs = [], []
        finished = Finished(
            finish_reason=reason,
            text=row.stream.text,
            token_ids=list(row.generated),
            prompt_tokens=len(row.prompt),
            completion_tokens=len(row.generated),
            error=error,
            first_token_time=row.first_token_time,
            end_time=time.monotonic(),
            logprobs=list(row.logprobs),
            prompt_logprobs=list(row.prompt_logprobs),
        )
        row.ended = True
        self._on_finish(row, finished)
        row.handle.push(finished)

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill(self, rows: list[Row]) -> None:
        for group in prefill_groups(rows):  # a newcomer tenant's prompts go alone (server.prefill_order)
            chunks = self._chunks(group)
            if chunks:
                self._prefill_chunks(chunks)
                return

    def _chunks(self, rows: list[Row]) -> list[tuple[Row, int, int]]:
        """(row, first position, tokens) for this step, in order, up to the prefill budget."""
        budget = self.prefill_chunk
        chunks: list[tuple[Row, int, int]] = []
        for row in rows:
            if budget == 0:
                break
            # A row that scores its prompt computes every position: cached blocks carry no logits.
            attachable = self.prefix_cache is not None and row.prefix_keys is None and not row.scores_prompt
            if attachable and not self.prefix_cache.attach(row):
                continue  # another row is computing this row's prefix now: reuse it next step
            count = min(len(row.prompt) - row.prefilled, budget)
            chunks.append((row, row.prefilled, count))
            budget -= count
        return chunks

    def _prefill_chunks(self, chunks: list[tuple[Row, int, int]]) -> None:
        width = max(count for _, _, count in chunks)
        input_ids = torch.full((len(chunks), width), PAD_TOKEN_ID, dtype=torch.long)
        for index, (row, start, count) in enumerate(chunks):
            input_ids[index, :count] = torch.as_tensor(row.prompt[start : start + count])
        starts = torch.tensor([start for _, start, _ in chunks])
        positions = starts[:, None] + torch.arange(width)[None, :]  # (B, width)
        span = int(positions.max()) + 1  # on the host: no device sync
        self.pool.ensure_positions(span)
        logits, scored = prefill_logits(
            self.model,
            host_to_device(input_ids, self._device),
            positions=host_to_device(positions, self._device),
            cache=self.pool.cache,
            cache_rows=self._tensor([row.cache_row for row, _, _ in chunks]),
            routing=self._routing([row.slot for row, _, _ in chunks]),
            last_index=self._tensor([count - 1 for _, _, count in chunks]),
            key_span=span,
            scored={index: count for index, (row, _, count) in enumerate(chunks) if row.scores_prompt},
        )  # (B, V) at each row's last token; every position of the scoring rows
        done = []
        for index, (row, start, count) in enumerate(chunks):
            if index in scored:
                if start == 0:
                    row.prompt_logprobs = [None]  # nothing predicts the first token
                row.prompt_logprobs += prompt_logprobs_of_chunk(scored[index], row.prompt, start, row.params.prompt_logprobs)
            row.prefilled = start + count
            if not row.prefilling:
                done.append(index)
                if self.prefix_cache is not None:
                    self.prefix_cache.store(row)
        scored_only = [i for i in done if chunks[i][0].params.max_tokens == 0]
        for index in scored_only:  # a prompt scored without generating: done once its logprobs are in
            self.finish(chunks[index][0], "length")
        done = [i for i in done if i not in scored_only]
        for index in done:
            row = chunks[index][0]
            if row.scores_prompt:
                row.handle.push(TextDelta("", [], prompt_logprobs=list(row.prompt_logprobs)))
        if done:
            # Rows whose whole prompt is in now get their first token from this call's logits.
            self._sample_and_accept([chunks[i][0] for i in done], logits[done])

    # ---- decode ----------------------------------------------------------------------------

    def _decode(self, rows: list[Row]) -> None:
        rows = sorted(rows, key=lambda row: row.cache_row)
        cache_rows = [row.cache_row for row in rows]
        positions = [row.next_position for row in rows]
        self.pool.ensure_positions(max(positions) + 1)
        logits = self.model(
            self._tensor([row.generated[-1] for row in rows])[:, None],
            positions=self._tensor(positions)[:, None],
            cache=self.pool.cache,
            # Rows 0..n-1 (the usual full batch) read the cache as a slice, not a gather.
            cache_rows=None if cache_rows == list(range(len(rows))) else self._tensor(cache_rows),
            routing=self._routing([row.slot for row in rows]),
            logits_for="last",
            key_span=max(positions) + 1,
        )[:, 0]  # (B, V)
        self._sample_and_accept(rows, logits)

    def _sample_and_accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        try:
            tokens = sample_next_tokens(logits, [row.params for row in rows], [row.generator for row in rows]).tolist()
        except Exception:  # one row's parameters broke the batched draw: find it row by row
            log.exception("batched sampling failed; sampling row by row")
            tokens = [self._sample_one(row, logits[index : index + 1]) for index, row in enumerate(rows)]
        entries = self._logprobs(rows, logits, tokens)
        for row, token, entry in zip(rows, tokens, entries):  # the step's one device sync
            if token is None:
                continue
            try:
                self._accept(row, token, entry)
            except Exception:  # a stop string or detokenization failure ends this row only
                log.exception("request %s failed while accepting a token", row.handle.request_id)
                self._fail(row)

    def _logprobs(self, rows: list[Row], logits: torch.Tensor, tokens: list[int | None]) -> list[TokenLogprob | None]:
        """The chosen tokens' logprobs for the rows that asked, from the logits they were sampled from."""
        asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None and tokens[i] is not None]
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if asking:
            computed = token_logprobs(logits[asking], [tokens[i] for i in asking], [rows[i].params.logprobs for i in asking])
            for index, entry in zip(asking, computed):
                entries[index] = entry
        return entries

    def _sample_one(self, row: Row, logits: torch.Tensor) -> int | None:
        try:
            return int(sample_next_tokens(logits, [row.params], [row.generator])[0])
        except Exception:
            log.exception("request %s failed in sampling", row.handle.request_id)
            self._fail(row)
            return None

    def _fail(self, row: Row) -> None:
        try:
            self.finish(row, "error", error=ROW_FAILED)
        except Exception:  # finishing itself broke: at least the reader learns it is over
            log.exception("request %s could not be finished cleanly", row.handle.request_id)
            if not row.handle.done:
                row.handle.push(Finished("error", "", [], len(row.prompt), len(row.generated), error=ROW_FAILED))

    def _accept(self, row: Row, token: int, entry: TokenLogprob | None = None) -> None:
        row.mark_first_token()
        if entry is not None:
            row.logprobs.append(entry)
            row.unsent_logprobs.append(entry)
        if token in self.stop_token_ids:
            self.finish(row, "stop")
            return
        row.generated.append(token)
        row.unsent_ids.append(token)
        text = row.stream.push(token)
        if row.stream.stopped:
            self.finish(row, "stop")
            return
        if text:
            row.handle.push(TextDelta(text, row.unsent_ids, row.unsent_logprobs))
            row.unsent_ids, row.unsent_logprobs = [], []
        if len(row.generated) >= row.params.max_tokens:
            self.finish(row, "length")

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return host_to_device(torch.tensor(values, dtype=torch.long), self._device)

    def _routing(self, slots: list[int]) -> AdapterRouting | None:
        """The routing of the batch about to run; the merger sees it first (it may merge now)."""
        routing = None  # the base alone: skip the LoRA path entirely
        if any(slot >= 0 for slot in slots):
            if self._slot_copies is not None:
                self._slot_copies.ready(slot for slot in set(slots) if slot >= 0)
            # Built on the host, so its derived fields cost no device sync, then moved.
            routing = AdapterRouting(torch.tensor(slots, dtype=torch.long)).to(self._device, non_blocking=self._device.type == "cuda")
        if self.merger is not None:
            self.merger.before_batch(routing)
        return routing
