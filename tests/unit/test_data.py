"""Corpus, tokenizer, packing, and the layout-independent global sample order."""

from __future__ import annotations

import json
import os

import pytest
import torch

from p3d.config.compose import compose, to_object
from p3d.data import (
    ByteTokenizer,
    DataParallelSampler,
    GlobalSampleOrder,
    build_sampler,
    builtin_documents,
    load_documents,
    make_batch,
    tokenize_and_pack,
)
from p3d.config.schema import Packing
from p3d.data import IGNORE_INDEX
from p3d.errors import ConfigError


def data_config(*overrides):
    return to_object(compose(list(overrides))).data


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


def test_packing_makes_windows_of_seq_len_plus_one_with_document_separators():
    dataset = load_documents(data_config())
    windows = tokenize_and_pack(dataset, ByteTokenizer(), "text", 32)
    assert windows.shape[1] == 33
    assert (windows == ByteTokenizer.eos_token_id).any()


def test_labels_are_inputs_shifted_by_one():
    windows = torch.arange(10).reshape(2, 5)
    batch = make_batch(windows, Packing.stream, eos_token_id=99)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])
    assert batch.input_ids.shape == batch.labels.shape == (2, 4)
    assert torch.equal(batch.position_ids, torch.arange(4).expand(2, 4))
    assert batch.document_ids is None


def test_document_packing_restarts_positions_and_ignores_cross_document_labels():
    eos = 9
    # documents: [1 2 eos] [3 eos] [4 5 ...; the second row starts inside a document
    windows = torch.tensor([[1, 2, eos, 3, eos, 4, 5], [6, eos, 7, 8, 8, eos, 1]])
    batch = make_batch(windows, Packing.documents, eos)
    assert batch.input_ids.tolist() == [[1, 2, eos, 3, eos, 4], [6, eos, 7, 8, 8, eos]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    # an end-of-document input would predict the next document's first token: ignored
    assert batch.labels.tolist() == [[2, eos, IGNORE_INDEX, eos, IGNORE_INDEX, 5], [eos, IGNORE_INDEX, 8, 8, eos, IGNORE_INDEX]]
    assert batch.valid_label_count() == 8


def test_global_order_is_deterministic_and_each_epoch_a_permutation():
    order = GlobalSampleOrder(10, seed=3)
    first_epoch = order.windows(0, 10)
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(first_epoch, GlobalSampleOrder(10, seed=3).windows(0, 10))
    second_epoch = order.windows(10, 10)
    assert sorted(second_epoch.tolist()) == list(range(10))
    assert not torch.equal(first_epoch, second_epoch)
    assert not torch.equal(first_epoch, GlobalSampleOrder(10, seed=4).windows(0, 10))


@pytest.mark.parametrize("dp, micro", [(1, 8), (1, 2), (2, 2), (4, 1), (8, 1)])
def test_a_step_covers_the_same_global_batch_on_every_layout(dp, micro):
    windows = torch.arange(40 * 3).reshape(40, 3)
    order = GlobalSampleOrder(40, seed=0)
    expected = windows[order.windows(16, 8)]
    rows = []
    for rank in range(dp):
        sampler = DataParallelSampler(windows, order, global_batch_size=8, micro_batch_size=micro, dp=dp, dp_rank=rank)
        batches = sampler.micro_batches(consumed_samples=16)
        assert len(batches) == sampler.accumulation_steps == 8 // (dp * micro)
        rows += [torch.cat([inputs, labels[-1:]]) for batch in batches for inputs, labels in zip(batch.input_ids, batch.labels)]
    assert torch.equal(torch.stack(rows), expected)


def test_local_jsonl_text_and_parquet_files_load(tmp_path):
    rows = [{"text": f"document number {i} " * 20} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_documents(data_config(f"data.path={tmp_path / 'a.jsonl'}"))) == 5
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i in range(3):
        (text_dir / f"{i}.txt").write_text(f"file {i}\nsecond line\n")
    assert len(load_documents(data_config(f"data.path={text_dir}"))) == 3
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    assert len(load_documents(data_config(f"data.path={tmp_path / 'b.parquet'}"))) == 5


def test_missing_text_column_names_the_key(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ConfigError, match="data.text_field=text"):
        load_documents(data_config(f"data.path={tmp_path / 'a.jsonl'}"))


def test_sampler_from_config_is_deterministic():
    config = to_object(compose(["data.seq_len=64"]))
    first = build_sampler(config.data, config.model, 0, 4, 2, 1, 0).micro_batches(0)
    second = build_sampler(config.data, config.model, 0, 4, 2, 1, 0).micro_batches(0)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in zip(first, second))


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_a_checkpoint_without_tokenizer_files_falls_back_to_bytes(arch, tmp_path):
    """transformers builds an empty tokenizer from a bare OPT config.json; p3d must not train on it."""
    from transformers import AutoConfig

    AutoConfig.for_model(arch).save_pretrained(tmp_path)
    config = to_object(compose(["model.init=pretrained", f"model.pretrained={tmp_path}"]))
    from p3d.data import build_tokenizer

    assert isinstance(build_tokenizer(config.data, config.model), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"^data.tokenizer="):
        build_tokenizer(data_config(f"data.tokenizer={tmp_path}"), config.model)


def test_data_fingerprint_tells_changed_files_apart_without_reading_them(tmp_path):
    from p3d.data import data_fingerprint, fingerprint_change

    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n')
    (tmp_path / "notes.md").write_text("not data")  # not a data file: ignored, as by the loader
    config = data_config(f"data.path={tmp_path}")
    saved = json.loads(json.dumps(data_fingerprint(config)))  # as stored in a checkpoint marker
    assert saved["kind"] == "files" and set(saved["files"]) == {"a.txt", "sub/b.jsonl"}
    assert fingerprint_change(saved, data_fingerprint(config)) is None
    (tmp_path / "notes.md").write_text("edited")
    assert fingerprint_change(saved, data_fingerprint(config)) is None
    (tmp_path / "a.txt").write_text("ALPHA\n")  # same size, new modification time
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert fingerprint_change(saved, data_fingerprint(config)) == "a.txt was modified since"
    (tmp_path / "a.txt").write_text("alpha, longer\n")
    (tmp_path / "c.txt").write_text("gamma\n")
    (tmp_path / "sub" / "b.jsonl").unlink()
    assert fingerprint_change(saved, data_fingerprint(config)) == "c.txt is new and 2 more changes"
    single = data_config(f"data.path={tmp_path / 'c.txt'}")
    assert set(data_fingerprint(single)["files"]) == {"c.txt"}


def test_builtin_and_hub_fingerprints(monkeypatch):
    import datasets

    from p3d.data import data_fingerprint, fingerprint_change

    builtin = data_fingerprint(data_config())
    assert builtin["kind"] == "builtin" and builtin == data_fingerprint(data_config())
    assert fingerprint_change(builtin, {**builtin, "xxh3_128": "0"}) == "the built-in corpus differs (another Python version)"

    class Builder:
        hash = "rev1"

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, name: Builder())
    hub = data_fingerprint(data_config("data.path=someone/corpus"))
    assert hub == {"kind": "hub", "id": "someone/corpus", "name": None, "split": "train", "revision": "rev1"}
    Builder.hash = "rev2"
    assert fingerprint_change(hub, data_fingerprint(data_config("data.path=someone/corpus"))) == "revision rev1 then, rev2 now"
    assert fingerprint_change(hub, {**hub, "revision": None}) is None  # not resolvable now (offline): not a change
    assert fingerprint_change(hub, builtin) == "it was a hub source, now a builtin one"


def test_the_builtin_corpus_is_packed_without_importing_datasets_and_like_a_dataset(tmp_path):
    """`import datasets` costs every rank ~0.12 GB; the built-in corpus does without it. The windows
    are the same as from a `datasets.Dataset` of the same texts (so data positions of runs agree)."""
    import subprocess
    import sys

    code = (
        "import sys; from p3d.data import build_sampler; from p3d.config.compose import compose, to_object; "
        "c = to_object(compose([])); build_sampler(c.data, c.model, 0, 8, 2, 1, 0); print('datasets' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    import datasets

    texts = builtin_documents()
    as_dataset = datasets.Dataset.from_dict({"text": texts})
    assert torch.equal(tokenize_and_pack(texts, ByteTokenizer(), "text", 32), tokenize_and_pack(as_dataset, ByteTokenizer(), "text", 32))
