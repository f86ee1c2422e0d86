"""What a search checks before it creates its run folder or starts Ray.

The space file's own rules are the schema's (`automla.schema.parse`); here are the checks that
need the world outside the file: the cluster named by `--address` / RAY_ADDRESS answers as a
Ray cluster (within seconds, where `ray.init` would retry for minutes), and the data every
trial will read exists and holds enough tokens for one batch.
"""

from __future__ import annotations

import json
import os

from automla.domains import probe_values
from automla.feasibility import sample_configs
from automla.schema import SearchConfig, SpaceError, section_path
from automla.trainers.config import ConfigError, TrainConfig, to_dict

PROBE_TIMEOUT_S = 5.0
"""How long the cluster probe waits for an answer."""

# the GCS call the probe makes: any Ray head answers it, even one that refuses the caller
_GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
_TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and make the cluster's token available (~/.ray/auth_token, "
    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
)


class ClusterError(ValueError):
    """The cluster address names no Ray cluster this machine can join."""


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS, after checking that a Ray cluster
    answers there; None (or 'local') starts a local Ray. Raises ClusterError within
    PROBE_TIMEOUT_S, naming the address, when none does."""
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return None
    label = f"{flag} {address}"
    if address == "auto":
        return _find_local_cluster(label)
    if address.startswith("ray://"):  # Ray Client: a plain gRPC proxy, probed for a listener
        _probe_tcp(label, address.removeprefix("ray://"), default_port=10001)
        return address
    host, port = _host_port(label, address)
    _probe_gcs(label, f"{host}:{port}")
    return address


def check_data(config: SearchConfig) -> None:
    """Read the data the trials will train on, as each will, once per distinct data setting
    (a missing, empty, binary or too short file; token ids above the vocabulary); raises
    SpaceError naming the setting at fault: a searched value when another value of the same
    key reads fine, else the fixed setting."""
    from automla.space import apply

    errors: dict[str, ConfigError | None] = {}
    for combo, cfg in sample_configs(config):
        error = _data_error(cfg, errors)
        if error is None:
            continue
        for key, value in combo.items():
            for other in probe_values(config.space[key]):
                try:
                    alternative = apply(config.fixed, {**combo, key: other})
                except ConfigError:
                    continue
                if _data_error(alternative, errors) is None:
                    raise SpaceError(
                        config.source,
                        f"space.{key}",
                        f"value {to_dict(value)!r} is invalid: {section_path(error.path)}: "
                        f"{error.message}",
                    )
        raise SpaceError(config.source, section_path(error.path), error.message)


def _data_error(cfg: TrainConfig, seen: dict[str, ConfigError | None]) -> ConfigError | None:
    """Why `cfg`'s data cannot train (None: it can); each distinct data setting read once."""
    from automla.trainers.data import load_data

    key = json.dumps([to_dict(cfg.data), cfg.seq_len, cfg.model.vocab_size], sort_keys=True)
    if key not in seen:
        try:
            load_data(cfg.data, cfg.seq_len, vocab_size=cfg.model.vocab_size)
            seen[key] = None
        except ConfigError as e:
            seen[key] = e
    return seen[key]


def _find_local_cluster(label: str) -> str:
    from automla import compat

    try:
        found = compat.local_cluster_address()
    except ConnectionError:
        raise ClusterError(
            f"{label}: no running Ray cluster found on this machine; start one with "
            "`ray start --head` or give its HOST:PORT"
        ) from None
    _probe_gcs(f"{label} (found {found})", found)
    return found


def _host_port(label: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"{label}: expected HOST:PORT of a Ray head (e.g. 127.0.0.1:6379), 'auto' or "
            "ray://HOST:PORT"
        )
    return host, int(port)


def _probe_tcp(label: str, target: str, default_port: int) -> None:
    import socket

    host, _, port = target.rpartition(":")
    if not host:
        host, port = target, str(default_port)
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"{label}: nothing answers there ({e})") from None


def _probe_gcs(label: str, target: str) -> None:
    """One call to the head's GCS, with this machine's token when token mode is on."""
    import grpc

    from automla import compat

    auth = compat.token_metadata()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(_GCS_METHOD)
        try:
            call(b"", timeout=PROBE_TIMEOUT_S, metadata=auth)
            return
        except grpc.RpcError as e:
            code, details = e.code(), (e.details() or "").strip()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if auth:
            raise ClusterError(
                f"{label}: the Ray cluster there rejects this machine's token; use the "
                f"cluster's own ({_TOKEN_HELP})"
            )
        raise ClusterError(f"{label}: the Ray cluster there requires its token: {_TOKEN_HELP}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise ClusterError(f"{label}: no answer within {PROBE_TIMEOUT_S:g} s; is the head up?")
    if code == grpc.StatusCode.UNAVAILABLE:
        raise ClusterError(f"{label}: no Ray cluster answers there ({_why_unavailable(details)})")
    raise ClusterError(
        f"{label}: something answers there, but not a Ray head's GCS port (the one `ray start "
        "--head` prints, 6379 by default)"
    )


def _why_unavailable(details: str) -> str:
    text = details.lower()
    if "connection refused" in text:
        return "connection refused: nothing listens on that port"
    if "lookup" in text or "resolv" in text or "name" in text and "not found" in text:
        return "the host name does not resolve"
    if "http/2" in text or "settings frame" in text:
        return "the port speaks something else than gRPC; a Ray head's GCS port is 6379 by default"
    return details.splitlines()[0][:200] if details else "unreachable"
