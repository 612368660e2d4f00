"""Token ids of a template's three parts (templates.py): the shared prefix, a passage's block, a query's part.

Each part is tokenised on its own, so a block's ids (and so its stored KV and its key) never depend on the query.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvrank.errors import KvrankError
from kvrank.reranker.model import LoadedLM
from kvrank.reranker.templates import PromptTemplate
from kvrank.types import Passage

logger = logging.getLogger(__name__)


class PromptTokens:
    """Tokenizes passages and queries into `template`'s parts, truncated to the token budgets."""

    def __init__(self, lm: LoadedLM, template: PromptTemplate, max_passage_tokens: int, max_query_tokens: int):
        self.tokenizer = lm.tokenizer
        self.template = template
        self.max_passage_tokens = max_passage_tokens
        self.max_query_tokens = max_query_tokens
        bos = [self.tokenizer.bos_token_id] if lm.spec.needs_bos and self.tokenizer.bos_token_id is not None else []
        self.prefix_ids: list[int] = bos + self.encode(template.prefix)

    def blocks_ids(self, passages: Sequence[Passage]) -> list[list[int]]:
        """Block token ids of several passages, tokenized in one call (an empty passage: the EOS token)."""
        texts = [self.template.passage_text(p.title, p.text) for p in passages]
        return [ids[: self.max_passage_tokens] or [self.tokenizer.eos_token_id or 0]
                for ids in self.encode_many(texts)]

    def query_ids(self, query: str) -> tuple[list[int], int, int]:
        """Ids of the query part, and the [start, end) span of the query's own tokens in them."""
        lead = self.encode(self.template.query_lead)
        own = self.encode(" " + query.strip())[: self.max_query_tokens]
        tail = self.encode(self.template.query_tail)
        return lead + own + tail, len(lead), len(lead) + len(own)

    def single_token(self, text: str, param: str = "token") -> int:
        """The id of `text` as one token (its first token, with a warning, if it is several); `param` names the
        argument `text` came from, for the error."""
        ids = self.encode(text)
        if len(ids) != 1:
            logger.warning("%r is %d tokens for this tokenizer; using its first token", text, len(ids))
        if not ids:
            raise KvrankError(f"{param} {text!r} encodes to nothing; pass a non-empty word", param=param)
        return ids[0]

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (empty text: none), in one tokenizer call."""
        todo = [i for i, text in enumerate(texts) if text]
        out: list[list[int]] = [[] for _ in texts]
        if not todo:
            return out
        try:
            encoded = self.tokenizer([texts[i] for i in todo], add_special_tokens=False).input_ids
        except TypeError:  # how a fast tokenizer refuses a lone surrogate (from JSON's "\\ud800" or a file)
            for i in todo:
                try:
                    texts[i].encode("utf-8")
                except UnicodeEncodeError as err:
                    raise KvrankError(f"text {texts[i][:40]!r} holds U+{ord(texts[i][err.start]):04X} at character "
                                      f"{err.start}, a lone surrogate that is not valid unicode; pass UTF-8 text"
                                      ) from None
            raise
        for i, ids in zip(todo, encoded):
            out[i] = list(ids)
        return out
