"""Turn the configured sources into ONE fixed token set: every model is run over exactly these tokens.

Pure computation, no store I/O: `iter_token_set` streams blocks of packed sequences in their final
order and the store writer persists them; `token_set_id` names the set by everything that
determines its tokens, so a cache can tell whether it was built from the same tokens.

How a token set is made, one module per step:

1. ``plan``: the spec is checked and sized; ``n_sequences`` is split between the sources by weight
   and seeded shuffles fix which source gives each sequence and which of its sequences, so the
   last ``n_validation`` sequences (the validation split) are a random sample of every source.
2. ``naming``: the sources are described (local files by content hash) and the id is the hash of
   the description, the sizes, the seed and the tokenizer's fingerprint.
3. ``sources`` (with ``files`` and ``chat``): each source yields documents, str or list[int] for
   ``kind = "tokenized"``; conversations are rendered with the chat template.
4. ``packing``: per source, documents + separator (the tokenizer's EOS unless the source names
   another) are packed into ``[BOS] + context_length - 1`` token sequences that never mix
   sources, staged in a scratch file and read back in the plan's order.
"""

from pipeline.tokens.chat import Document
from pipeline.tokens.errors import TokenSourceError
from pipeline.tokens.naming import TOKEN_SET_FORMAT, describe_sources, token_set_id
from pipeline.tokens.packing import build_token_set, iter_token_set
from pipeline.tokens.plan import TokenSetPlan, plan_token_set
from pipeline.tokens.sources import iter_documents

__all__ = [
    "TokenSourceError",
    "TokenSetPlan",
    "plan_token_set",
    "describe_sources",
    "token_set_id",
    "iter_documents",
    "iter_token_set",
    "build_token_set",
    "TOKEN_SET_FORMAT",
    "Document",
]
