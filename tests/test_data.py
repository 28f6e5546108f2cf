import json
import os

import numpy as np
import pytest
import torch

from herd.train.data import INDEX_FILE, PackedLoader, TokenShards, iter_documents, tokenize_to_shards

EOS = 256


class ByteTok:
    """Byte-level stand-in for the tokenizer: id = byte value."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_shards(tmp_path, name, texts, **kw):
    src = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    tokenize_to_shards([src], tmp_path / name, ByteTok(), **kw)
    return TokenShards(tmp_path / name)


def corpus(n, seed, fill="x"):
    rng = np.random.default_rng(seed)
    return [f"{i}:" + fill * int(rng.integers(1, 60)) for i in range(n)]


def test_round_trip_txt_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill the first (one document per .txt file)")
    (tmp_path / "b.txt").write_text("héllo wörld")
    write_jsonl(tmp_path / "c.jsonl", ["one", "two two", "three three three"])
    texts = [(tmp_path / "a.txt").read_text(), "héllo wörld", "one", "two two", "three three three"]
    srcs = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"]
    # a tiny shard size forces several shards; documents never span shards
    info = tokenize_to_shards(srcs, tmp_path / "out", ByteTok(), shard_tokens=20, eos_id=EOS)
    shards = TokenShards(tmp_path / "out")
    assert len(shards) == len(info.shards) > 1
    want = [ByteTok().encode(t) + [EOS] for t in texts]
    assert [d.tolist() for d in shards.documents()] == want
    assert shards.num_documents == 5 and shards.total_tokens == sum(map(len, want))
    assert sum(info.bad_records.values()) == 0
    # document starts: the concatenation of each shard, cut at its starts, gives the documents back
    got = []
    for toks, starts in zip(shards.tokens, shards.doc_starts):
        assert starts[0] == 0 and np.all(np.diff(starts) > 0)
        got += [toks[a:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(toks)])]
    assert got == want
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_round_trip_parquet(tmp_path):
    import pyarrow as pa  # a test dependency: the parquet path must not go untested
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha", None, "beta gamma", ""]}), tmp_path / "p.parquet")
    with pytest.warns(UserWarning, match="1 missing_text.*1 empty"):
        tokenize_to_shards([tmp_path / "p.parquet"], tmp_path / "out", ByteTok(), text_key="body")
    docs = [d.tolist() for d in TokenShards(tmp_path / "out").documents()]
    assert docs == [ByteTok().encode("alpha"), ByteTok().encode("beta gamma")]


def test_bad_records_counted_and_skipped(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join([
        b'{"text": "good one"}\n',
        b'{"text": "broken\n',                 # line 2: invalid JSON
        b'{"text": "bad \xff\xfe bytes"}\n',   # line 3: not UTF-8
        b'{"text": ""}\n',                     # line 4: empty document
        b'{"other": "no text key"}\n',         # line 5: missing text
        b'{"text": "   "}\n',                  # line 6: blank document
        b'[1, 2]\n',                           # line 7: JSON but not an object
        b'{"text": "good two"}\n',
    ]))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    with pytest.warns(UserWarning) as record:
        info = tokenize_to_shards([src, tmp_path / "bad.txt"], tmp_path / "out", ByteTok())
    msgs = [str(w.message) for w in record]
    assert len(msgs) == 2  # one summary line per file, not one per record
    assert "bad.jsonl" in msgs[0] and "line 2" in msgs[0] and "line 3" in msgs[0] and "line 5" in msgs[0]
    assert info.bad_records == {"invalid_json": 2, "undecodable": 2, "missing_text": 1, "empty": 2}
    docs = [d.tolist() for d in TokenShards(tmp_path / "out").documents()]
    assert docs == [ByteTok().encode("good one"), ByteTok().encode("good two")]
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text())["bad_records"] == info.bad_records


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_documents(tmp_path / "x.csv"))


def test_atomic_on_failure(tmp_path):
    class Boom(ByteTok):
        calls = 0

        def encode(self, text):
            Boom.calls += 1
            if Boom.calls == 30:
                raise RuntimeError("tokenizer died")
            return super().encode(text)

    src = write_jsonl(tmp_path / "a.jsonl", corpus(50, 0))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="tokenizer died"):
        tokenize_to_shards([src], out, Boom(), shard_tokens=64)  # several shards were flushed before the failure
    assert os.listdir(out) == []
    with pytest.raises(FileNotFoundError):
        TokenShards(out)
    # a finished set is not overwritten
    tokenize_to_shards([src], out, ByteTok())
    with pytest.raises(FileExistsError):
        tokenize_to_shards([src], out, ByteTok())


def test_batch_fields_and_document_positions(tmp_path):
    texts = corpus(40, 1)
    shards = make_shards(tmp_path, "a", texts, eos_id=EOS)
    T = 32
    loader = PackedLoader([(shards, 1.0)], seq_len=T, batch_size=4, seed=0)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(shards.documents())])
    stream = np.concatenate(list(shards.documents()))
    checked_boundary = False
    for _ in range(10):
        b = next(loader)
        for k in ("tokens", "targets", "positions", "doc_ids"):
            assert b[k].shape == (4, T) and b[k].dtype == torch.int64
        assert b["loss_mask"].shape == (4, T) and b["loss_mask"].dtype == torch.bool
        for r in range(4):
            tok, tgt = b["tokens"][r].numpy(), b["targets"][r].numpy()
            assert np.array_equal(tok[1:], tgt[:-1])
            # locate the window in the stream (single shard here) to get the true document of each token
            start = next(s for s in range(0, len(stream) - T, T) if np.array_equal(stream[s:s + T], tok))
            docs = doc_of[start:start + T + 1]
            new_doc = np.r_[True, docs[1:-1] != docs[:-2]]
            assert np.array_equal(b["doc_ids"][r].numpy(), np.cumsum(new_doc) - 1)
            # positions restart at 0 at the window start and at every document start
            pos = b["positions"][r].numpy()
            assert np.all(pos[new_doc] == 0)
            assert np.all(pos[~new_doc] == pos[np.flatnonzero(~new_doc) - 1] + 1)
            # no loss where the target is the first token of the next document
            assert np.array_equal(b["loss_mask"][r].numpy(), docs[1:] == docs[:-1])
            # the target of EOS is the next document's first token: masked; EOS itself is a target
            eos_at = np.flatnonzero(tok == EOS)
            assert not b["loss_mask"][r].numpy()[eos_at].any()
            checked_boundary |= len(eos_at) > 0
    assert checked_boundary


def test_mixture_weights(tmp_path):
    a = make_shards(tmp_path, "a", corpus(60, 2, "a"))
    b = make_shards(tmp_path, "b", corpus(60, 3, "b"))
    loader = PackedLoader([(a, 4.0), (b, 1.0)], seq_len=16, batch_size=50, seed=7)  # weights normalise to 0.8/0.2
    src = torch.cat([next(loader)["source"] for _ in range(40)])  # 2000 samples
    frac = (src == 0).float().mean().item()
    assert abs(frac - 0.8) < 0.03
    # rows really come from the source they are attributed to (source a is made of "a"s, b of "b"s)
    batch = next(loader)
    for row, s in zip(batch["tokens"], batch["source"]):
        assert (row == ord("ab"[s])).any() and not (row == ord("ba"[s])).any()


def test_determinism(tmp_path):
    a = make_shards(tmp_path, "a", corpus(60, 4))
    b = make_shards(tmp_path, "b", corpus(60, 5))

    def batches(seed, n=6):
        loader = PackedLoader([(a, 0.5), (b, 0.5)], seq_len=16, batch_size=8, seed=seed)
        return [next(loader) for _ in range(n)]

    x, y, z = batches(1), batches(1), batches(2)
    assert all(torch.equal(p[k], q[k]) for p, q in zip(x, y) for k in p)
    assert not all(torch.equal(p["tokens"], q["tokens"]) for p, q in zip(x, z))


def test_epochs_cover_every_window_once(tmp_path):
    shards = make_shards(tmp_path, "a", corpus(30, 6), shard_tokens=200)
    T = 16
    n_windows = sum((len(t) - 1) // T for t in shards.tokens)
    loader = PackedLoader([(shards, 1.0)], seq_len=T, batch_size=1, seed=3)
    epoch1 = [tuple(next(loader)["tokens"][0].tolist()) for _ in range(n_windows)]
    want = sorted(tuple(t[s:s + T].astype(np.int64).tolist()) for t in shards.tokens
                  for s in range(0, len(t) - T, T))
    assert sorted(epoch1) == want
    epoch2 = [tuple(next(loader)["tokens"][0].tolist()) for _ in range(n_windows)]
    assert sorted(epoch2) == want and epoch2 != epoch1  # reshuffled
    assert loader.state_dict()["sources"][0]["epoch"] == 1


def test_exact_resume(tmp_path):
    a = make_shards(tmp_path, "a", corpus(15, 8))  # ~30 windows: the 12 batches below wrap around
    b = make_shards(tmp_path, "b", corpus(10, 9))

    def new():
        return PackedLoader([(a, 0.7), (b, 0.3)], seq_len=16, batch_size=6, seed=11)

    loader = new()
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able
    expected = [next(loader) for _ in range(5)]
    fresh = new()
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    # the sources wrapped around at least once, so resume crosses an epoch boundary too
    assert any(s["epoch"] > 0 for s in fresh.state_dict()["sources"])
    other = PackedLoader([(a, 0.7), (b, 0.3)], seq_len=16, batch_size=6, seed=12)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
