"""Data sources: the stdlib split, user files, MQAR by construction, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automla.trainers import DataConfig, load_data
from automla.trainers.data import is_validation, stdlib_bytes, stdlib_files


@pytest.fixture
def fake_stdlib(tmp_path):
    """A stdlib-shaped tree; crc32 / 2**32 of the paths: a.py .590, b.py .517, c.py .238,
    d.py .630 (hand-computed), so val_fraction 0.3 holds out c.py alone."""
    root = tmp_path / "lib"
    files = {"a.py": b"A" * 50, "b.py": b"B" * 60, "c.py": b"C" * 70, "d.py": b"D" * 80}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_bytes(b"X" * 500)
    (root / "notes.txt").write_bytes(b"not python")
    return root


def test_stdlib_split_by_path_hash(fake_stdlib):
    assert stdlib_files(fake_stdlib) == ["a.py", "b.py", "c.py", "d.py"]
    train, val = stdlib_bytes(0.3, None, fake_stdlib)
    assert bytes(val.tolist()) == b"C" * 70
    assert bytes(train.tolist()) == b"A" * 50 + b"B" * 60 + b"D" * 80
    # max_bytes caps the corpus in sorted-path order, cutting the last file read
    train, val = stdlib_bytes(0.3, 120, fake_stdlib)
    assert bytes(train.tolist()) == b"A" * 50 + b"B" * 60
    assert bytes(val.tolist()) == b"C" * 10


def test_stdlib_split_is_never_empty(fake_stdlib):
    # no path hashes below 0.01: the lowest-hash file (c.py) is held out all the same
    train, val = stdlib_bytes(0.01, None, fake_stdlib)
    assert bytes(val.tolist()) == b"C" * 70 and len(train) == 190
    # every path hashes below 0.99: the highest-hash file (d.py) trains
    train, val = stdlib_bytes(0.99, None, fake_stdlib)
    assert bytes(train.tolist()) == b"D" * 80 and len(val) == 180
    with pytest.raises(ValueError, match="at least 2"):
        stdlib_bytes(0.3, 40, fake_stdlib)


def test_split_hash_is_pinned():
    # hand-computed CRC-32 fractions: a change of hash would silently move files between splits
    assert is_validation("asyncio/tasks.py", 0.995) and not is_validation("asyncio/tasks.py", 0.99)
    assert is_validation("json/__init__.py", 0.47) and not is_validation("json/__init__.py", 0.46)


def test_real_stdlib_is_deterministic_and_disjoint():
    cfg = DataConfig(max_bytes=400_000, val_fraction=0.2)
    train, val = load_data(cfg, 64)
    files = stdlib_files()
    assert files == sorted(files) and "os.py" in files
    assert not any("site-packages" in f for f in files)
    held = [f for f in files if is_validation(f, 0.2)]
    assert held and len(held) < len(files)
    stdlib_bytes.cache_clear()
    train2, val2 = load_data(cfg, 64)
    assert torch.equal(train.tokens, train2.tokens) and torch.equal(val.tokens, val2.tokens)
    assert len(train) + len(val) == 400_000 and len(val) > 0


def window_matches(x, y, flat: np.ndarray):
    """Every row of x is a contiguous slice of flat and y is x shifted by one token."""
    T = x.shape[1]
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        starts = [i for i in range(len(flat) - T) if flat[i : i + T].tolist() == row_x]
        assert any(flat[s + 1 : s + T + 1].tolist() == row_y for s in starts)


def test_tokens_file(tmp_path):
    path = tmp_path / "train.bin"
    flat = np.arange(1000, dtype=np.uint16) * 7 % 1009  # distinct ids, so slices are unique
    flat.tofile(path)
    cfg = DataConfig(source="tokens", path=str(path), val_fraction=0.1)
    train, val = load_data(cfg, 16, vocab_size=1009)
    assert len(train) == 900 and len(val) == 100
    x, y = train.sample(4, torch.Generator().manual_seed(0))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    window_matches(x, y, flat[:900])
    vx, vy = val.fixed_batches(2, 3)[1]
    window_matches(vx, vy, flat[900:])
    with pytest.raises(ValueError, match="vocab_size"):
        load_data(cfg, 16, vocab_size=1000)


def test_text_file(tmp_path):
    text = "".join(f"line {i}: héllo wörld\n" for i in range(200))
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    train, val = load_data(DataConfig(source="text", path=str(path), val_fraction=0.25), 32)
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    n_val = int(len(raw) * 0.25)
    assert len(val) == n_val and len(train) == len(raw) - n_val
    x, y = train.sample(5, torch.Generator().manual_seed(1))
    window_matches(x, y, raw[: len(raw) - n_val])


def test_validation_batches_are_fixed_and_training_batches_seeded(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("abcdefghij" * 300)
    train, val = load_data(DataConfig(source="text", path=str(path)), 32)
    a, b = val.fixed_batches(3, 4), val.fixed_batches(3, 4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(train.sample(8, g1)[0], train.sample(8, g2)[0])
    assert not torch.equal(train.sample(8, g1)[0], train.sample(8, g1)[0])


def test_bad_files_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(DataConfig(source="text", path=str(tmp_path / "missing.txt")), 8)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_data(DataConfig(source="text", path=str(short)), 64)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_data(DataConfig(source="text", path=str(binary)), 8)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 101)
    with pytest.raises(ValueError, match="uint16"):
        load_data(DataConfig(source="tokens", path=str(odd)), 8)
    with pytest.raises(ValueError, match="vocab_size"):
        load_data(DataConfig(), 8, vocab_size=100)  # bytes need 256 ids


def test_mqar_by_construction():
    pairs, vocab, T = 4, 20, 24
    cfg = DataConfig(source="mqar", mqar_pairs=pairs, mqar_vocab=vocab, mqar_examples=200)
    train, val = load_data(cfg, T)
    n_keys = (vocab - 1) // 2  # keys 1..9, values 10..19
    x, y = train.x, train.y
    assert x.shape == y.shape == (200, T)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0 : 2 * pairs : 2], row_x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k <= n_keys for k in keys)
        assert all(n_keys < v < vocab for v in values)
        answer = dict(zip(keys, values))
        asked = [t for t, target in enumerate(row_y) if target != -100]
        # every key asked exactly once, after the pairs, its value as target and next token
        assert sorted(row_x[t] for t in asked) == sorted(keys)
        assert all(t >= 2 * pairs for t in asked)
        for t in asked:
            assert row_y[t] == answer[row_x[t]]
            assert t + 1 == T or row_x[t + 1] == row_y[t]
        rest = set(range(2 * pairs, T)) - set(asked) - {t + 1 for t in asked}
        assert all(row_x[t] == 0 for t in rest)
    # the query order varies between rows: not always the order of the pairs
    firsts = [row[[t for t in range(T) if y[i, t] != -100][0]].item() for i, row in enumerate(x)]
    assert any(f != x[i, 0].item() for i, f in enumerate(firsts))


def test_mqar_hand_decoded_row():
    """One row written out: the prefix pairs and where each query's value is the target."""
    cfg = DataConfig(source="mqar", mqar_pairs=2, mqar_vocab=8, mqar_examples=1)
    train, _ = load_data(cfg, 10)
    x, y = train.x[0].tolist(), train.y[0].tolist()
    k1, v1, k2, v2 = x[:4]
    lookup = {k1: v1, k2: v2}
    q = [t for t in range(10) if y[t] != -100]
    assert len(q) == 2 and q[0] >= 4 and q[1] >= q[0] + 2
    assert {x[q[0]], x[q[1]]} == {k1, k2}
    assert [y[t] for t in q] == [lookup[x[t]] for t in q]
    assert y[:4] == [-100] * 4


def test_mqar_is_seeded_and_splits_differ():
    cfg = DataConfig(source="mqar", mqar_examples=64, mqar_val_examples=64)
    a_train, a_val = load_data(cfg, 64)
    b_train, _ = load_data(cfg, 64)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert not torch.equal(a_train.x, a_val.x)
    c_train, _ = load_data(DataConfig(source="mqar", mqar_examples=64, seed=1), 64)
    assert not torch.equal(a_train.x, c_train.x)
    batches = a_val.fixed_batches(2, 8)
    assert torch.equal(batches[1][0], a_val.x[8:16])
    with pytest.raises(ValueError, match="seq_len"):
        load_data(DataConfig(source="mqar", mqar_pairs=8), 20)
    with pytest.raises(ValueError, match="vocab_size"):
        load_data(cfg, 64, vocab_size=64)
