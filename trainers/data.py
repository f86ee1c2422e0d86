"""Offline training data: byte-level stdlib source, a user's text or token file, and MQAR.

`load_data(cfg, seq_len)` returns a (train, validation) pair of sources. A source gives
batches `(x, y)` of int64 [B, seq_len] with `sample(batch_size, generator)` (random, for
training) and `fixed_batches(n, batch_size)` (the same batches on every call, for evaluation).
Targets of -100 are ignored by the loss.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig

IGNORE = -100
# Offsets the validation seeds from the training seed, so the two never share a stream.
_VAL_SEED_OFFSET = 1_000_003
STDLIB_DEFAULT_BYTES = 8_000_000
"""What `data.max_bytes: null` reads of the stdlib corpus: enough for short runs, read fast."""


class WindowSource:
    """Random windows of seq_len + 1 tokens from one flat token array; y is x shifted by one."""

    def __init__(self, tokens: torch.Tensor | np.ndarray, seq_len: int, *, seed: int, name: str):
        n = len(tokens)
        if n < seq_len + 1:
            raise ValueError(
                f"{name} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a longer file, a shorter seq_len or a smaller val_fraction"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.name = name
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(
            0, len(self.tokens) - self.seq_len, (batch_size,), generator=generator
        )
        return self._windows(start)

    def fixed_batches(
        self, n_batches: int, batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        return [self.sample(batch_size, g) for _ in range(n_batches)]

    def _windows(self, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = start[:, None] + self._offsets  # (B, T + 1)
        if isinstance(self.tokens, np.ndarray):
            chunk = torch.from_numpy(self.tokens[idx.numpy()].astype(np.int64))
        else:
            chunk = self.tokens[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


class MQARSource:
    """A fixed set of multi-query associative recall sequences (Zoology's MQAR).

    Each row of seq_len + 1 tokens opens with `pairs` key-value pairs (distinct keys), then
    asks for every key once, in random order, at random places of the remaining filler (token
    0), each query key followed by its value. Targets are -100 except at the query keys,
    whose target is the value that follows them.
    """

    def __init__(self, cfg: DataConfig, seq_len: int, n_examples: int, seed: int, offset: int = 0):
        pairs, vocab = cfg.mqar_pairs, cfg.mqar_vocab
        slots = (seq_len + 1 - 2 * pairs) // 2
        if slots < pairs:
            raise ValueError(
                f"MQAR with {pairs} pairs needs seq_len >= {4 * pairs - 1}, got {seq_len}"
            )
        n_keys = (vocab - 1) // 2
        g = torch.Generator().manual_seed(seed)
        n = n_examples
        # the `pairs` smallest of each row's random draws, by value (as a full argsort would
        # rank them, without sorting every row)
        keys = torch.rand(n, n_keys, generator=g).topk(pairs, largest=False).indices + 1
        values = torch.randint(1 + n_keys, vocab, (n, pairs), generator=g)
        order = torch.rand(n, pairs, generator=g).argsort(1)  # the order keys are asked in
        # query j sits in two-token slot qslot[:, j] after the pairs, slots in increasing order
        qslot = torch.rand(n, slots, generator=g).topk(pairs, largest=False).indices.sort(1).values
        # Rows are built when sampled: a set of 16k rows of 2k tokens would be ~0.5 GB per trial
        # for the few hundred rows a short run reads.
        self._keys, self._values = keys, values
        self._asked_keys, self._asked_values = keys.gather(1, order), values.gather(1, order)
        self._qpos = 2 * pairs + 2 * qslot  # (n, pairs) position of each query key
        self.offset = offset
        self.seq_len = seq_len
        self.vocab_size = vocab + offset

    def rows(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the examples r, [len(r), seq_len] each."""
        pairs = self._keys.shape[1]
        qpos = self._qpos[r]
        seq = torch.zeros(len(r), self.seq_len + 1, dtype=torch.long)
        seq[:, 0 : 2 * pairs : 2] = self._keys[r]
        seq[:, 1 : 2 * pairs : 2] = self._values[r]
        seq.scatter_(1, qpos, self._asked_keys[r])
        seq.scatter_(1, qpos + 1, self._asked_values[r])
        y = torch.full((len(r), self.seq_len), IGNORE, dtype=torch.long)
        y.scatter_(1, qpos, self._asked_values[r] + self.offset)
        return seq[:, :-1] + self.offset, y

    @property
    def x(self) -> torch.Tensor:
        """Every example's inputs (built on each access: for inspection, not training)."""
        return self.rows(torch.arange(len(self)))[0]

    @property
    def y(self) -> torch.Tensor:
        """Every example's targets (-100 except at the query keys)."""
        return self.rows(torch.arange(len(self)))[1]

    def __len__(self) -> int:
        return len(self._keys)

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(torch.randint(0, len(self), (batch_size,), generator=generator))

    def fixed_batches(
        self, n_batches: int, batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # rows in order, wrapping around when the set is smaller than what is asked
        rows = torch.arange(n_batches * batch_size) % len(self)
        return [self.rows(r) for r in rows.split(batch_size)]


class MixedSource:
    """Training batches of which a fixed number of rows (`share` of the batch, rounded) come
    from an MQAR set, the rest from `main`; the rows keep their order (MQAR last)."""

    def __init__(self, main: WindowSource, mqar: MQARSource, share: float):
        self.main, self.mqar, self.share = main, mqar, share
        self.seq_len = main.seq_len

    def __len__(self) -> int:
        return len(self.main)

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_mqar = min(batch_size, round(self.share * batch_size))
        xm, ym = self.main.sample(batch_size - n_mqar, generator)
        xq, yq = self.mqar.sample(n_mqar, generator)
        return torch.cat([xm, xq]), torch.cat([ym, yq])

    def fixed_batches(
        self, n_batches: int, batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.main.fixed_batches(n_batches, batch_size)


Source = WindowSource | MQARSource | MixedSource


def mqar_probe(cfg: DataConfig, seq_len: int, vocab_size: int) -> MQARSource | None:
    """The MQAR validation set of a mixed source (`cfg.mqar_mix` > 0), ids shifted as in
    training; None without a mix."""
    if cfg.mqar_mix <= 0:
        return None
    offset = vocab_size - cfg.mqar_vocab
    return MQARSource(cfg, seq_len, cfg.mqar_val_examples, cfg.seed + _VAL_SEED_OFFSET, offset)


def load_data(
    cfg: DataConfig, seq_len: int, *, vocab_size: int | None = None
) -> tuple[Source, Source]:
    """The (train, validation) sources of `cfg` for sequences of seq_len tokens.

    vocab_size, when given, is checked against the token ids the data uses. Data that cannot
    train (a missing, empty, binary or too short file) raises ConfigError naming the setting
    at fault (`data.path`, `data.max_bytes`, `model.vocab_size`).
    """
    if seq_len < 1:
        raise ConfigError("seq_len", f"must be >= 1, got {seq_len}")
    val_seed = cfg.seed + _VAL_SEED_OFFSET
    if cfg.source == "mqar":
        _check_vocab(cfg.mqar_vocab - 1, vocab_size, "mqar_vocab")
        try:
            train = MQARSource(cfg, seq_len, cfg.mqar_examples, cfg.seed)
        except ValueError as e:
            raise ConfigError("data.mqar_pairs", str(e)) from None
        val = MQARSource(cfg, seq_len, cfg.mqar_val_examples, val_seed)
        return train, val

    max_id = 255  # bytes, unless a token file says otherwise
    key = "data.path"  # what to change when the data is too short
    if cfg.source == "stdlib":
        where, key = "the stdlib corpus", "data.max_bytes"
        _check_vocab(255, vocab_size, f"{where} (bytes)")
        max_bytes = STDLIB_DEFAULT_BYTES if cfg.max_bytes is None else cfg.max_bytes
        try:
            train_tok, val_tok = stdlib_bytes(cfg.val_fraction, max_bytes)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    elif cfg.source == "text":
        where = f"text file {cfg.path}"
        _check_vocab(255, vocab_size, f"{where} (bytes)")
        train_tok, val_tok = _split_tail(_read_text(cfg.path, cfg.max_bytes), cfg.val_fraction)
    elif cfg.source == "tokens":
        where = f"tokens file {cfg.path}"
        tokens = _read_tokens(cfg.path, cfg.max_bytes)
        max_id = _max_token(tokens)
        _check_vocab(max_id, vocab_size, where)
        train_tok, val_tok = _split_tail(tokens, cfg.val_fraction)
    else:
        raise ConfigError("data.source", f"must be stdlib|text|tokens|mqar, got {cfg.source!r}")
    try:
        train = WindowSource(train_tok, seq_len, seed=cfg.seed, name=f"training split of {where}")
        val = WindowSource(val_tok, seq_len, seed=val_seed, name=f"validation split of {where}")
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if cfg.mqar_mix > 0:
        return _mix_mqar(cfg, train, seq_len, vocab_size, max_id), val
    return train, val


def _mix_mqar(
    cfg: DataConfig, train: WindowSource, seq_len: int, vocab_size: int | None, max_id: int
) -> MixedSource:
    if vocab_size is None or vocab_size - cfg.mqar_vocab <= max_id:
        raise ConfigError(
            "model.vocab_size",
            f"data.mqar_mix puts MQAR's {cfg.mqar_vocab} token ids above the main data's "
            f"(max id {max_id}): model.vocab_size must be at least "
            f"{max_id + 1 + cfg.mqar_vocab}, got {vocab_size}",
        )
    offset = vocab_size - cfg.mqar_vocab
    return MixedSource(
        train, MQARSource(cfg, seq_len, cfg.mqar_examples, cfg.seed, offset), cfg.mqar_mix
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """The standard library's .py files, as sorted POSIX paths relative to its root."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise ValueError(f"the Python standard library was not found at {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # installed packages live under the stdlib root on some systems: they are not stdlib
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Stable split: the CRC-32 of the relative path, the same on every machine."""
    return zlib.crc32(rel_path.encode()) < val_fraction * 2**32


@functools.lru_cache(maxsize=4)
def stdlib_bytes(
    val_fraction: float, max_bytes: int | None, root: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 tensors of the stdlib's .py files, read in sorted order until
    max_bytes are read, each file going to the split its path hash picks."""
    root = root or stdlib_root()
    files: list[tuple[str, bytes]] = []
    total = 0
    for rel in stdlib_files(root):
        if max_bytes is not None and total >= max_bytes:
            break
        data = (root / rel).read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        files.append((rel, data))
        total += len(data)
    if len(files) < 2:
        raise ValueError(
            f"the stdlib corpus at {root} gave {len(files)} file(s) within max_bytes={max_bytes}; "
            "a train/validation split needs at least 2: raise max_bytes"
        )
    val_ids = {i for i, (rel, _) in enumerate(files) if is_validation(rel, val_fraction)}
    # a small corpus can leave a side empty: then the file with the extreme hash moves over
    by_hash = sorted(range(len(files)), key=lambda i: zlib.crc32(files[i][0].encode()))
    if not val_ids:
        val_ids = {by_hash[0]}
    elif len(val_ids) == len(files):
        val_ids.discard(by_hash[-1])
    train = b"".join(d for i, (_, d) in enumerate(files) if i not in val_ids)
    val = b"".join(d for i, (_, d) in enumerate(files) if i in val_ids)
    return _as_tensor(train), _as_tensor(val)


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _read_text(path: str | None, max_bytes: int | None = None) -> torch.Tensor:
    """The file's bytes (its first max_bytes, cut back to a whole UTF-8 character)."""
    p = _existing_file(path, "text")
    with open(p, "rb") as f:
        data = f.read(-1 if max_bytes is None else max_bytes)
    if not data:
        raise ConfigError("data.path", f"text file {p} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        cut = max_bytes is not None and e.start >= len(data) - 3 and e.reason.startswith("unexp")
        if not cut:
            raise ConfigError(
                "data.path",
                f"text file {p} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                f"{e.start}); for a binary file of uint16 token ids use source: tokens",
            ) from None
        data = data[: e.start]  # max_bytes fell inside a character
    return _as_tensor(data)


def _read_tokens(path: str | None, max_bytes: int | None = None) -> np.ndarray:
    p = _existing_file(path, "tokens")
    size = p.stat().st_size
    if size == 0:
        raise ConfigError("data.path", f"tokens file {p} is empty")
    if size % 2:
        raise ConfigError(
            "data.path",
            f"tokens file {p} has {size} bytes, not a whole number of uint16 tokens",
        )
    tokens = np.memmap(p, dtype=np.uint16, mode="r")
    return tokens if max_bytes is None else tokens[: max(1, max_bytes // 2)]


def _existing_file(path: str | None, kind: str) -> Path:
    if not path:
        raise ConfigError("data.path", f"source '{kind}' needs a file path")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError("data.path", f"{kind} file {p} is a directory, not a file")
    if not p.is_file():
        raise ConfigError("data.path", f"{kind} file {p} does not exist")
    return p


def _max_token(tokens: np.ndarray) -> int:
    chunk = 1 << 24  # bounded memory on multi-GB files
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def _split_tail(tokens, val_fraction: float):
    """The last val_fraction of the tokens is the validation split."""
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _check_vocab(max_id: int, vocab_size: int | None, where: str) -> None:
    if vocab_size is not None and max_id >= vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{where} uses token id {max_id}, which does not fit model.vocab_size={vocab_size}; "
            f"set model.vocab_size >= {max_id + 1}",
        )
