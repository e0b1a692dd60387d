"""Corpus, tokenizer, token cache, packing, the layout-independent global sample order, mixtures,
chat labels and held-out documents (one process; multi-rank behaviour is in tests/distributed)."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from p3d.config.compose import compose, to_object
from p3d.config.schema import Packing
from p3d.data import (
    IGNORE_INDEX,
    BatchPrefetcher,
    ByteTokenizer,
    DataParallelSampler,
    GlobalSampleOrder,
    Rows,
    ShuffledWindows,
    TokenStream,
    build_eval_sampler,
    build_sampler,
    builtin_documents,
    make_batch,
    open_cache,
    training_sources,
)
from p3d.errors import ConfigError


def config(tmp_path, *overrides):
    return to_object(compose([f"data.cache_dir={tmp_path / 'cache'}", *overrides]))


def data_config(*overrides):
    return to_object(compose(list(overrides))).data


def sampler_for(tmp_path, *overrides, batch=4, seed=0):
    c = config(tmp_path, *overrides)
    return build_sampler(c.data, c.model, seed, batch, batch, 1, 0)


def documents_of(stream: TokenStream, eos: int = ByteTokenizer.eos_token_id) -> list[str]:
    """The texts of a byte-tokenized stream, from its document index."""
    starts = [int(s) for s in stream.starts] + [len(stream.tokens)]
    pieces = [np.asarray(stream.tokens[a:b]) for a, b in zip(starts, starts[1:])]
    assert all(piece[-1] == eos for piece in pieces)
    return [bytes(piece[:-1].astype(np.uint8)).decode() for piece in pieces]


def test_builtin_corpus_is_real_text_and_needs_no_download():
    documents = builtin_documents()
    assert len(documents) > 50
    assert sum(len(d) for d in documents) > 300_000
    assert any("the" in d and "." in d for d in documents)


def test_byte_tokenizer_round_trips():
    tokenizer = ByteTokenizer()
    (ids,) = tokenizer.encode_batch(["héllo"])
    assert bytes(ids).decode("utf-8") == "héllo"
    assert max(ids) < tokenizer.eos_token_id < tokenizer.vocab_size


# --- the token cache --------------------------------------------------------------------------------


def test_the_cache_holds_every_document_once_with_its_end_token_in_uint16(tmp_path):
    c = config(tmp_path)
    (source,) = training_sources(c.data)
    cached = open_cache(source, ByteTokenizer(), tmp_path / "cache")
    stream = cached.stream("train")
    assert stream.tokens.dtype == np.uint16 and not stream.tokens.flags.writeable
    assert documents_of(stream) == builtin_documents()
    manifest = json.loads((cached.directory / "manifest.json").read_text())
    assert manifest["identity"]["tokenizer"]["kind"] == "byte" and manifest["identity"]["source"]["kind"] == "builtin"
    assert manifest["p3d_version"] and manifest["parts"]["train"]["documents"] == len(builtin_documents())


def test_a_second_open_maps_the_built_cache_without_tokenizing(tmp_path, monkeypatch):
    c = config(tmp_path)
    (source,) = training_sources(c.data)
    first = open_cache(source, ByteTokenizer(), tmp_path / "cache")
    import p3d.data.cache as cache

    monkeypatch.setattr(cache, "build_entry", lambda *args, **kwargs: pytest.fail("the cache was built again"))
    assert open_cache(source, ByteTokenizer(), tmp_path / "cache").directory == first.directory


def test_a_changed_source_or_tokenizer_builds_a_new_cache(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"first version {i}"}) for i in range(50)))
    c = config(tmp_path, f"data.path={corpus}")
    (source,) = training_sources(c.data)
    before = open_cache(source, ByteTokenizer(), tmp_path / "cache")
    corpus.write_text("\n".join(json.dumps({"text": f"second version {i}"}) for i in range(50)))
    os.utime(corpus, ns=(1, 1))
    after = open_cache(source, ByteTokenizer(), tmp_path / "cache")
    assert after.directory != before.directory and before.directory.exists()
    assert documents_of(after.stream("train"))[0] == "second version 0"
    assert documents_of(before.stream("train"))[0] == "first version 0"

    class OtherBytes(ByteTokenizer):
        eos_token_id = 0

    other = open_cache(source, OtherBytes(), tmp_path / "cache")
    assert other.directory not in (before.directory, after.directory)
    assert int(other.stream("train").tokens[len("second version 0")]) == 0


def test_local_jsonl_json_text_csv_and_parquet_files_are_read_file_by_file(tmp_path):
    rows = [{"text": f"document number {i} " * 3} for i in range(5)]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (data / "b.json").write_text(json.dumps(rows))
    (data / "sub" / "c.txt").write_text("one file is one document\nsecond line\n")
    (data / "d.csv").write_text("id,text\n1,a csv row\n2,\"another, quoted\"\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows], "id": list(range(5))}), data / "e.parquet", row_group_size=2)
    c = config(tmp_path, f"data.path={data}")
    (source,) = training_sources(c.data)
    texts = documents_of(open_cache(source, ByteTokenizer(), tmp_path / "cache").stream("train"))
    expected = [r["text"] for r in rows] * 2 + ["a csv row", "another, quoted"] + [r["text"] for r in rows] + ["one file is one document\nsecond line\n"]
    assert texts == expected  # files in sorted order (a.jsonl, b.json, d.csv, e.parquet, sub/c.txt)


def test_a_parallel_build_of_many_parts_equals_one_process(tmp_path, monkeypatch):
    """Worker processes tokenize parts (byte ranges of .jsonl files: a line cut by a boundary is read
    once); the joined cache is the one a single process builds."""
    import p3d.data.cache as cache
    import p3d.data.sources as sources

    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        (data / f"part{index}.jsonl").write_text("".join(json.dumps({"text": f"file {index} row {i} " + "x" * (i % 17)}) + "\n" for i in range(300)))
    monkeypatch.setattr(sources, "UNIT_BYTES", 1000)
    c = config(tmp_path, f"data.path={data}", "data.eval_fraction=0.2")
    (source,) = training_sources(c.data)
    serial = open_cache(source, ByteTokenizer(), tmp_path / "serial", eval_fraction=0.2, workers=1)
    monkeypatch.setattr(cache, "POOL_MIN_BYTES", 0)
    parallel = open_cache(source, ByteTokenizer(), tmp_path / "parallel", eval_fraction=0.2, workers=2)
    assert parallel.manifest["build"]["processes"] == 2 and parallel.manifest["build"]["units"] > 20
    for name in ("train.tokens.bin", "train.starts.bin", "eval.tokens.bin", "eval.starts.bin"):
        assert (serial.directory / name).read_bytes() == (parallel.directory / name).read_bytes(), name
    texts = documents_of(parallel.stream("train")) + documents_of(parallel.stream("eval"))
    assert sorted(texts) == sorted(f"file {f} row {i} " + "x" * (i % 17) for f in range(3) for i in range(300))


# --- windows, labels, packing -----------------------------------------------------------------------


def rows_of(tokens, starts, targets=None) -> Rows:
    tokens = np.asarray(tokens, dtype=np.int64)
    return Rows(tokens, np.asarray(starts, dtype=bool), None if targets is None else np.asarray(targets, dtype=bool))


def test_labels_are_inputs_shifted_by_one():
    batch = make_batch(rows_of(np.arange(10).reshape(2, 5), np.zeros((2, 5))), Packing.stream)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])
    assert batch.input_ids.shape == batch.labels.shape == (2, 4)
    assert torch.equal(batch.position_ids, torch.arange(4).expand(2, 4))
    assert batch.document_ids is None


def test_document_packing_restarts_positions_and_ignores_cross_document_labels():
    eos = 9
    # documents: [1 2 eos] [3 eos] [4 5 ...; the second row starts inside a document
    tokens = [[1, 2, eos, 3, eos, 4, 5], [6, eos, 7, 8, 8, eos, 1]]
    starts = [[1, 0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1]]
    batch = make_batch(rows_of(tokens, starts), Packing.documents)
    assert batch.input_ids.tolist() == [[1, 2, eos, 3, eos, 4], [6, eos, 7, 8, 8, eos]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    # a document's last token would predict the next document's first token: ignored
    assert batch.labels.tolist() == [[2, eos, IGNORE_INDEX, eos, IGNORE_INDEX, 5], [eos, IGNORE_INDEX, 8, 8, eos, IGNORE_INDEX]]
    assert batch.valid_label_count() == 8


def test_document_boundaries_come_from_the_cache_index_not_from_end_tokens():
    """A chat template may put the end-of-document id inside a conversation: it stays one document."""
    stream = TokenStream.from_documents([[1, 9, 2], [3, 4]], eos=9)
    rows = stream.read(np.asarray([0]), 7)
    assert rows.tokens.tolist() == [[1, 9, 2, 9, 3, 4, 9]] and rows.starts.tolist() == [[1, 0, 0, 0, 1, 0, 0]]
    batch = make_batch(rows, Packing.documents)
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1]]


def test_only_target_tokens_are_labels():
    tokens = [[10, 11, 12, 13, 14, 15]]
    targets = [[0, 0, 1, 1, 0, 1]]
    batch = make_batch(rows_of(tokens, [[1, 0, 0, 0, 0, 0]], targets), Packing.documents)
    assert batch.labels.tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 15]]


def test_windows_are_read_on_demand_from_the_map(tmp_path):
    sampler = sampler_for(tmp_path, "data.seq_len=32", batch=8)
    stream = sampler.streams[0]
    base = stream.tokens.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap)  # not an array in memory
    (batch,) = sampler.micro_batches(0)
    _, windows = sampler.order.at(0, 8)
    expected = np.stack([np.asarray(stream.tokens[w * 33 : (w + 1) * 33], dtype=np.int64) for w in windows])
    assert torch.equal(batch.input_ids, torch.from_numpy(expected[:, :-1]))


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_reading_windows_all_over_a_large_cache_does_not_grow_resident_memory(tmp_path):
    """The pages read for a step are dropped from the process's mapping (they stay in the page cache)."""
    tokens = np.arange(40 * 2**20, dtype=np.uint16)  # 80 MB
    tokens.tofile(tmp_path / "train.tokens.bin")
    np.arange(0, len(tokens), 5000, dtype=np.uint64).tofile(tmp_path / "train.starts.bin")
    stream = TokenStream.open(tmp_path, "train", "uint16", chat=False)
    window = 129
    windows = np.random.default_rng(0).permutation(len(tokens) // window)[:20_000]
    before = resident_mb()
    for step in range(0, len(windows), 16):  # 20,000 windows: 4 KB pages of 80 MB touched at random
        rows = stream.read(windows[step : step + 16], window)
    assert resident_mb() - before < 8, f"resident memory grew by {resident_mb() - before:.0f} MB"
    assert rows.tokens[-1, 0] == (windows[-1] * window) % 2**16


def test_reading_a_window_does_not_copy_the_document_index(tmp_path):
    """The index of document starts grows with the corpus; finding a window's starts in it must be a
    binary search in place (a lookup in another dtype made numpy convert the whole index, every window)."""
    import tracemalloc

    documents = 2_000_000
    np.zeros(documents * 4, dtype=np.uint16).tofile(tmp_path / "train.tokens.bin")
    np.arange(0, documents * 4, 4, dtype=np.uint64).tofile(tmp_path / "train.starts.bin")  # 16 MB of index
    stream = TokenStream.open(tmp_path, "train", "uint16", chat=False)
    tracemalloc.start()
    try:
        rows = stream.read(np.arange(0, 2000, 100), 9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"reading 20 windows allocated {peak / 2**20:.0f} MB"
    assert rows.starts[1].tolist() == [True, False, False, False, True, False, False, False, True]


# --- the global order -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 10, 17, 64, 1000, 4099, 86_481])
def test_each_epoch_of_a_source_is_a_permutation_computed_per_position(count):
    order = ShuffledWindows(count, seed=3)
    permuted = []
    permute = order._permute
    order._permute = lambda values, keys: permuted.append(len(values)) or permute(values, keys)
    assert sorted(order.compute(np.arange(count)).tolist()) == list(range(count))
    assert sum(permuted) <= 2 * max(count, 2)  # the Feistel range is under twice the windows: few passes per value
    del order._permute
    first = order.windows(np.arange(count))
    assert np.array_equal(first, order.compute(np.arange(count)))
    assert sorted(first.tolist()) == list(range(count))
    second = order.windows(np.arange(count, 2 * count))
    assert sorted(second.tolist()) == list(range(count))
    assert np.array_equal(first, ShuffledWindows(count, seed=3).windows(np.arange(count)))
    assert np.array_equal(order.windows(np.arange(5, 9) % count), first[np.arange(5, 9) % count])  # any position alone
    late = np.arange(3 * count + 4090, 3 * count + 4100)  # across a chunk of the order, in a later epoch
    assert np.array_equal(ShuffledWindows(count, seed=3).windows(late), order.compute(late))
    if count >= 10:
        assert not np.array_equal(first, second)
        assert not np.array_equal(first, ShuffledWindows(count, seed=4).windows(np.arange(count)))
        assert not np.array_equal(first, np.arange(count))


def test_steps_take_their_windows_from_a_chunk_of_the_order_computed_at_once():
    """A step's few samples come from a chunk of 4,096 computed in one numpy pass (the cost is per
    call): 256 steps of 16 samples need the passes of one chunk, not of 256 small requests."""
    order = ShuffledWindows(1_000_000, seed=0)
    calls = []
    permute = order._permute
    order._permute = lambda values, keys: calls.append(len(values)) or permute(values, keys)
    steps = [order.windows(np.arange(step * 16, (step + 1) * 16)) for step in range(256)]
    assert len(calls) < 30 and calls[0] == 4096
    assert np.array_equal(np.concatenate(steps), ShuffledWindows(1_000_000, seed=0).compute(np.arange(4096)))


@pytest.mark.parametrize("count", [10_000, 100_000])  # 14 bits: balanced halves; 17 bits: unbalanced ones
def test_the_shuffle_is_not_ordered_in_a_visible_way(count):
    windows = ShuffledWindows(count, seed=0).windows(np.arange(count))
    assert sorted(windows.tolist()) == list(range(count))
    assert abs(np.corrcoef(np.arange(count), windows)[0, 1]) < 0.05
    steps = np.abs(np.diff(windows))
    assert np.median(steps) > count / 5  # neighbours in the order are not neighbours in the corpus (random: 0.29 count)


def stream_sampler(windows: int, global_batch: int, micro: int, dp: int, rank: int) -> DataParallelSampler:
    stream = TokenStream(np.arange(windows * 3, dtype=np.int64), np.zeros(0, dtype=np.uint64), None)
    order = GlobalSampleOrder([windows], [1.0], seed=0)
    return DataParallelSampler([stream], order, 2, global_batch, micro, dp, rank)


@pytest.mark.parametrize("dp, micro", [(1, 8), (1, 2), (2, 2), (4, 1), (8, 1)])
def test_a_step_covers_the_same_global_batch_on_every_layout(dp, micro):
    _, windows = GlobalSampleOrder([40], [1.0], seed=0).at(16, 8)
    expected = torch.from_numpy(np.arange(120).reshape(40, 3)[windows])
    rows = []
    for rank in range(dp):
        sampler = stream_sampler(40, 8, micro, dp, rank)
        batches = sampler.micro_batches(consumed_samples=16)
        assert len(batches) == sampler.accumulation_steps == 8 // (dp * micro)
        rows += [torch.cat([inputs, labels[-1:]]) for batch in batches for inputs, labels in zip(batch.input_ids, batch.labels)]
    assert torch.equal(torch.stack(rows), expected)


def test_prefetched_steps_are_the_steps_read_directly_and_a_jump_is_read_where_it_lands(tmp_path):
    sampler = sampler_for(tmp_path, *two_sources(tmp_path), batch=8)
    direct = sampler_for(tmp_path, *two_sources(tmp_path), batch=8)
    prefetcher = BatchPrefetcher(sampler)
    try:
        for consumed in (0, 8, 16, 400, 408):  # 400: a resume elsewhere; the prefetched 24 is not handed out
            step = prefetcher.take(consumed)
            prefetcher.prefetch(consumed + 8)
            expected = direct.micro_batches(consumed)
            assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in zip(step.micro_batches, expected))
            assert step.samples_per_source == direct.source_counts(consumed)
    finally:
        prefetcher.close()


def test_sampler_from_config_is_deterministic(tmp_path):
    first = sampler_for(tmp_path, "data.seq_len=64").micro_batches(0)
    second = sampler_for(tmp_path, "data.seq_len=64").micro_batches(0)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in zip(first, second))


# --- mixtures ---------------------------------------------------------------------------------------


def two_sources(tmp_path, first: float = 0.8, second: float = 0.2) -> list[str]:
    for name, letter in (("a", "A"), ("b", "B")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": letter * 40}) for _ in range(30)))
    return [f"data.sources=[{{path: {tmp_path / 'a.jsonl'}, weight: {first}}}, {{path: {tmp_path / 'b.jsonl'}, weight: {second}}}]", "data.seq_len=8"]


def test_a_mixture_draws_each_source_in_its_share_and_resumes_exactly(tmp_path):
    sampler = sampler_for(tmp_path, *two_sources(tmp_path), batch=8)
    sources, _ = sampler.order.at(0, 1000)
    assert abs((sources == 0).mean() - 0.8) < 0.01 and abs((sources == 1).mean() - 0.2) < 0.01
    for start in (0, 37, 990, 5003):  # a block boundary inside, resumed mid-way
        windows = sampler.order.at(start, 64)
        again = sampler_for(tmp_path, *two_sources(tmp_path), batch=8).order.at(start, 64)
        assert all(np.array_equal(a, b) for a, b in zip(windows, again))
    continuous = [sampler.micro_batches(step * 8)[0].input_ids for step in range(200)]
    resumed = sampler_for(tmp_path, *two_sources(tmp_path), batch=8)
    assert all(torch.equal(continuous[step], resumed.micro_batches(step * 8)[0].input_ids) for step in range(120, 200))
    from_a = (torch.cat(continuous) == ord("A")).any(dim=1)  # source a holds A's (and end tokens) only
    assert abs(from_a.float().mean().item() - 0.8) < 0.01
    assert sampler.source_counts(0) == {"a": int((sources[:8] == 0).sum()), "b": int((sources[:8] == 1).sum())}
    other_seed = sampler_for(tmp_path, *two_sources(tmp_path), batch=8, seed=1).order.at(0, 1000)[0]
    assert not np.array_equal(other_seed, sources) and (other_seed == 0).sum() == 800


def test_mixture_weights_are_shares_and_a_zero_weight_leaves_a_source_out(tmp_path):
    sampler = sampler_for(tmp_path, *two_sources(tmp_path, 3, 1), batch=8)
    assert (sampler.order.at(0, 1000)[0] == 0).sum() == 750
    only_a = sampler_for(tmp_path, *two_sources(tmp_path, 1, 0), batch=8)
    assert only_a.labels == ("a",) and set(only_a.order.at(0, 100)[0].tolist()) == {0}


# --- held-out documents -----------------------------------------------------------------------------


def test_eval_fraction_documents_are_disjoint_from_training_and_deterministic(tmp_path):
    texts = [f"document {i}: " + "word " * (i % 13) for i in range(2000)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    overrides = [f"data.path={tmp_path / 'corpus.jsonl'}", "data.eval_fraction=0.1", "data.seq_len=16"]
    c = config(tmp_path, *overrides)
    (source,) = training_sources(c.data)
    cached = open_cache(source, ByteTokenizer(), tmp_path / "cache", eval_fraction=0.1)
    train, held = documents_of(cached.stream("train")), documents_of(cached.stream("eval"))
    assert not set(train) & set(held) and sorted(train + held) == sorted(texts)
    assert 0.08 < len(held) / len(texts) < 0.12
    sampler = build_sampler(c.data, c.model, 0, 8, 8, 1, 0)
    assert len(sampler.streams[0].tokens) == len(cached.stream("train").tokens)  # training reads the training part only
    evaluation = build_eval_sampler(c.data, c.model, 4, 2, 2, 1)
    assert evaluation.steps == evaluation.order.total // 4 > 0
    batches = list(evaluation)
    assert len(batches) == evaluation.steps and all(len(step) == 1 for step in batches)
    read = bytes(torch.cat([step[0].input_ids[0] for step in batches]).clamp(max=255).to(torch.uint8).tolist()).decode(errors="replace")
    assert any(text[:12] in read for text in held)
    again = open_cache(source, ByteTokenizer(), tmp_path / "other", eval_fraction=0.1)
    assert documents_of(again.stream("eval")) == held


def test_eval_path_is_read_whole_and_no_held_out_data_gives_no_sampler(tmp_path):
    (tmp_path / "held.txt").write_text("held-out text " * 50)
    c = config(tmp_path, f"data.eval_path={tmp_path / 'held.txt'}", "data.seq_len=16")
    evaluation = build_eval_sampler(c.data, c.model, 2, 2, 1, 0)
    assert evaluation.steps == (len("held-out text " * 50) + 1) // 17 // 2
    assert bytes(evaluation.micro_batches(0)[0].input_ids[0].tolist()).decode().startswith("held-out text")
    plain = config(tmp_path)
    assert build_eval_sampler(plain.data, plain.model, 2, 2, 1, 0) is None


# --- fingerprints and tokenizers ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_a_checkpoint_without_tokenizer_files_falls_back_to_bytes(arch, tmp_path):
    """transformers builds an empty tokenizer from a bare OPT config.json; p3d must not train on it."""
    from transformers import AutoConfig

    AutoConfig.for_model(arch).save_pretrained(tmp_path)
    c = to_object(compose(["model.init=pretrained", f"model.pretrained={tmp_path}"]))
    from p3d.data import build_tokenizer

    assert isinstance(build_tokenizer(c.data, c.model), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"^data.tokenizer="):
        build_tokenizer(data_config(f"data.tokenizer={tmp_path}"), c.model)


def test_data_fingerprint_tells_changed_files_apart_without_reading_them(tmp_path):
    from p3d.data import data_fingerprint, fingerprint_change

    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n')
    (tmp_path / "notes.md").write_text("not data")  # not a data file: ignored, as by the loader
    c = data_config(f"data.path={tmp_path}")
    saved = json.loads(json.dumps(data_fingerprint(c)))  # as stored in a checkpoint marker
    assert saved["kind"] == "files" and set(saved["files"]) == {"a.txt", "sub/b.jsonl"}
    assert fingerprint_change(saved, data_fingerprint(c)) is None
    (tmp_path / "notes.md").write_text("edited")
    assert fingerprint_change(saved, data_fingerprint(c)) is None
    (tmp_path / "a.txt").write_text("ALPHA\n")  # same size, new modification time
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert fingerprint_change(saved, data_fingerprint(c)) == "a.txt was modified since"
    (tmp_path / "a.txt").write_text("alpha, longer\n")
    (tmp_path / "c.txt").write_text("gamma\n")
    (tmp_path / "sub" / "b.jsonl").unlink()
    assert fingerprint_change(saved, data_fingerprint(c)) == "c.txt is new and 2 more changes"
    single = data_config(f"data.path={tmp_path / 'c.txt'}")
    assert set(data_fingerprint(single)["files"]) == {"c.txt"}


def test_a_mixture_fingerprint_names_the_source_that_changed(tmp_path):
    from p3d.data import data_fingerprint, fingerprint_change

    overrides = two_sources(tmp_path)
    saved = json.loads(json.dumps(data_fingerprint(data_config(*overrides))))
    assert saved["kind"] == "mixture" and len(saved["sources"]) == 2
    assert fingerprint_change(saved, data_fingerprint(data_config(*overrides))) is None
    (tmp_path / "b.jsonl").write_text('{"text": "other"}\n')
    assert fingerprint_change(saved, data_fingerprint(data_config(*overrides))).startswith("source 1: b.jsonl has ")


def test_builtin_and_hub_fingerprints(monkeypatch):
    import datasets

    from p3d.data import data_fingerprint, fingerprint_change
    from p3d.data import sources as sources_module

    builtin = data_fingerprint(data_config())
    assert builtin["kind"] == "builtin" and builtin == data_fingerprint(data_config())
    assert data_fingerprint(data_config("data=chat"))["name"] == "p3d.chat"
    assert fingerprint_change(builtin, {**builtin, "xxh3_128": "0"}) == "the built-in data differs (another Python or p3d version)"

    class Builder:
        hash = "rev1"

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, name: Builder())
    sources_module._hub_revision.cache_clear()
    hub = data_fingerprint(data_config("data.path=someone/corpus"))
    assert hub == {"kind": "hub", "id": "someone/corpus", "name": None, "split": "train", "revision": "rev1"}
    Builder.hash = "rev2"
    sources_module._hub_revision.cache_clear()
    assert fingerprint_change(hub, data_fingerprint(data_config("data.path=someone/corpus"))) == "revision rev1 then, rev2 now"
    assert fingerprint_change(hub, {**hub, "revision": None}) is None  # not resolvable now (offline): not a change
    assert fingerprint_change(hub, builtin) == "it was a hub source, now a builtin one"
    sources_module._hub_revision.cache_clear()


def test_the_builtin_corpus_is_cached_and_read_without_importing_datasets(tmp_path):
    """`import datasets` costs every rank ~0.12 GB; the built-in corpus (and local files) do without it."""
    import subprocess
    import sys

    (tmp_path / "a.jsonl").write_text('{"text": "some text that is long enough for a window"}\n' * 20)
    code = (
        "import sys; from p3d.data import build_sampler; from p3d.config.compose import compose, to_object; "
        f"c = to_object(compose(['data.cache_dir={tmp_path / 'cache'}', 'data.seq_len=16'])); build_sampler(c.data, c.model, 0, 8, 2, 1, 0); "
        f"c = to_object(compose(['data.cache_dir={tmp_path / 'cache'}', 'data.seq_len=16', 'data.path={tmp_path / 'a.jsonl'}'])); build_sampler(c.data, c.model, 0, 8, 2, 1, 0); "
        "print('datasets' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
