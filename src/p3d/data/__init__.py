"""Data: sources -> token cache (tokenized once, memory-mapped) -> global sample order -> batches.

    sources.py     which sources a config names, their checks and fingerprints, reading rows lazily
    tokenizers.py  byte or transformers tokenizers, with their identity
    chat.py        conversations -> text with the assistant's spans; the built-in chat set
    cache.py       the token cache: built once under a lock (in parallel), mapped read-only by every rank
    sampling.py    the global sample order (mixtures), each dp rank's micro-batches, held-out batches
"""

from p3d.data.cache import CachedSource, Rows, TokenStream, open_cache
from p3d.data.chat import builtin_conversations, render_builtin
from p3d.data.sampling import (
    BatchPrefetcher,
    StepData,
    IGNORE_INDEX,
    DataParallelSampler,
    EvalSampler,
    GlobalSampleOrder,
    SequentialOrder,
    ShuffledWindows,
    TokenBatch,
    build_eval_sampler,
    build_sampler,
    cache_root,
    make_batch,
)
from p3d.data.sources import (
    FILE_FORMATS,
    Source,
    builtin_documents,
    check_data_source,
    check_eval_source,
    data_fingerprint,
    eval_source,
    fingerprint_change,
    source_fingerprint,
    training_sources,
)
from p3d.data.tokenizers import TOKENIZER_FILES, ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BatchPrefetcher",
    "StepData",
    "FILE_FORMATS", "IGNORE_INDEX", "TOKENIZER_FILES", "ByteTokenizer", "CachedSource", "DataParallelSampler", "EvalSampler",
    "GlobalSampleOrder", "HFTokenizer", "Rows", "SequentialOrder", "ShuffledWindows", "Source", "TokenBatch", "TokenStream",
    "Tokenizer", "build_eval_sampler", "build_sampler", "build_tokenizer", "builtin_conversations", "builtin_documents",
    "cache_root", "check_data_source", "check_eval_source", "data_fingerprint", "eval_source", "fingerprint_change", "make_batch", "open_cache",
    "render_builtin", "source_fingerprint", "training_sources",
]
