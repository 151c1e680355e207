"""Token classes: a tokenizer's vocabulary decoded once, and which token ids belong to a class.

The analyses report statistics per token class (TokenClassSpec in [eval]: listed token strings, a
regex on the decoded token, or special / added tokens such as chat-template markers) and decode
the tokens of top-activating contexts. Both need every id decoded; decoding the vocabulary once
per tokenizer (a TokenTable) keeps that off the scan's path.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import numpy as np

from evals.config import TokenClassSpec


@dataclass
class TokenTable:
    """Every token id decoded once, and the ids of special / added tokens."""

    strings: list[str]
    special_ids: frozenset[int]

    @property
    def vocab_size(self) -> int:
        return len(self.strings)

    def decode(self, i: int) -> str:
        return self.strings[i] if 0 <= i < len(self.strings) else f"<id {i}>"

    def lookup(self, spec: TokenClassSpec) -> np.ndarray:
        """[vocab_size] bool: which token ids belong to the class.

        tokens  the decoded token string equals one of `values` exactly (" the" and "the" differ)
        regex   re.search of any of `values` matches the decoded token string
        special the id is a special or added token (BOS, EOS, chat markers); with `values`, only
                those whose string is listed
        """
        if spec.kind == "tokens":
            wanted = set(spec.values)
            return np.fromiter((s in wanted for s in self.strings), bool, len(self.strings))
        if spec.kind == "regex":
            pats = [re.compile(v) for v in spec.values]
            return np.fromiter((any(p.search(s) for p in pats) for s in self.strings), bool,
                               len(self.strings))
        if spec.kind == "special":
            out = np.zeros(len(self.strings), bool)
            ids = [i for i in self.special_ids if 0 <= i < len(self.strings)]
            if spec.values:
                ids = [i for i in ids if self.strings[i] in set(spec.values)]
            out[ids] = True
            return out
        raise ValueError(f"token class {spec.name!r}: unknown kind {spec.kind!r} (tokens, regex or special)")


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's vocabulary decoded id by id, computed once per tokenizer object."""
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(added)
    size = max([len(tokenizer), *(i + 1 for i in special)])
    strings = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    table = TokenTable(list(strings), frozenset(int(i) for i in special))
    try:
        _TABLES[tokenizer] = table
    except TypeError:  # not weak-referenceable: no cache
        pass
    return table


def select_token_class(spec: TokenClassSpec, token_ids, tokenizer) -> np.ndarray:
    """bool mask over `token_ids` (any shape): the positions of the class."""
    lookup = token_table(tokenizer).lookup(spec)
    ids = np.asarray(token_ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < lookup.size)
    return np.where(ok, lookup[np.clip(ids, 0, lookup.size - 1)], False)
