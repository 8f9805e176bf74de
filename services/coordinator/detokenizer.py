"""Streaming detokenization with stop strings.

Text is released token by token, but never (a) half a UTF-8 character (byte-level BPE splits them), nor
(b) text that might be the start of a stop string: that is held until it is known not to be one.
The offsets scheme is text-generation-inference's: decode a short window, not the whole answer.
"""

from __future__ import annotations


class StreamingDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str]):
        self.tokenizer = tokenizer
        # A few prompt tokens as context, so the first answer token decodes with its leading space etc.
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.context_len = len(self.ids)
        self.stops = [s for s in stops if s]
        self.text = ""          # all decoded answer text so far
        self.released = 0       # chars of self.text already handed out
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that may be released now (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stops:
            window_start = max(0, self.released - max(len(s) for s in self.stops))
            hits = [(self.text.find(s, window_start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, stop = min(hits)
                self.stopped_by = stop
                self.text = self.text[:idx]
            else:
                hold = self._stop_prefix_len()
                out = self.text[self.released: len(self.text) - hold]
                self.released += len(out)
                return out
        out = self.text[self.released:]
        self.released = len(self.text)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def finish(self) -> str:
        """Everything not yet released (held stop prefixes, trailing partial characters)."""
        if self.stopped_by is None:
            answer_ids = self.ids[self.context_len:]
            full = self._decode(answer_ids)
            if full.startswith(self.text):
                self.text = full
        out = self.text[self.released:]
        self.released = len(self.text)
        return out
