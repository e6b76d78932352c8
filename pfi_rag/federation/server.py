"""The server's round loop: sample, send the shared adapter, aggregate noisy updates, checkpoint.

We drive the rounds ourselves over Flower's ``Grid`` rather than ``Strategy.start`` because a
round must (a) resume from the last checkpoint after a restart, (b) fail loudly when too few
clients answer (Flower's loop carries on, and exits 0, when every client failed), and (c)
tell failed, sat-out and successful clients apart by name in the round record.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` wrapper does not fit: it expects full
weights, and it skips aggregation whenever any client errored, so one failing client would
silently stall training. DP-FedAvg here is the same mechanism written over deltas.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from pfi_rag.config import Config
from pfi_rag.federation import aggregation
from pfi_rag.federation.checkpoint import load_checkpoint, save_checkpoint
from pfi_rag.federation.global_adapter import AdapterFiles
from pfi_rag.federation.protocol import (
    CLIENT_ID,
    CONFIG,
    ERROR,
    FAILURE_CODES,
    LOSS_AFTER,
    LOSS_BEFORE,
    METRICS,
    NUM_EXAMPLES,
    OK,
    PRIVACY,
    SAT_OUT,
    STATUS,
    TRAIN_SECONDS,
    UPDATE,
    from_array_record,
    identity_query,
    train_message,
)
from pfi_rag.federation.records import (
    ClientMetrics,
    Failure,
    RoundRecord,
    SatOut,
    ServerDP,
    UpdateStats,
    write_round_record,
)
from pfi_rag.federation.strategies import shared_part
from pfi_rag.layout import global_adapter_dir, round_adapter_dir
from pfi_rag.privacy.round_metrics import released_loss_std

logger = logging.getLogger(__name__)


class FederationFailed(RuntimeError):
    """The federation did not finish: a round ended with fewer successful clients than
    ``federation.min_results``, or (raised by the launcher) Flower's processes did not run it."""


@dataclass
class RoundOutcome:
    round: int
    participants: list[str]
    results: dict[str, dict] = field(default_factory=dict)  # client -> {update, metrics, privacy}
    failures: list[Failure] = field(default_factory=list)
    sat_out: list[SatOut] = field(default_factory=list)


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected or time.monotonic() > deadline:
            return node_ids
        time.sleep(0.5)


def identify_nodes(grid: Grid, node_ids: list[int], timeout_s: float) -> dict[int, str]:
    """Ask each node which client it is (its id is all it tells)."""
    messages = [
        Message(
            content=identity_query(),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in node_ids
    ]
    names = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            # e.g. a simulation with more virtual nodes than clients: such a node takes no part.
            logger.warning("node %s did not identify itself: %s", node, reply.error.reason)
        else:
            names[node] = str(reply.content[CONFIG][CLIENT_ID])
    return names


def sample_nodes(node_ids: list[int], count: int, rng: np.random.Generator) -> list[int]:
    if count >= len(node_ids):
        return list(node_ids)
    # Sample positions, not ids: node ids span 64 bits and numpy would turn them into floats.
    picked = rng.choice(len(node_ids), size=count, replace=False)
    return sorted(node_ids[i] for i in picked)


def collect_round(
    grid: Grid, round_number: int, sampled: list[int], names: dict[int, str], global_arrays, cfg: Config
) -> RoundOutcome:
    messages = [
        Message(
            content=train_message(global_arrays, round_number, cfg.federation.strategy),
            message_type=MessageType.TRAIN,
            dst_node_id=node_id,
        )
        for node_id in sampled
    ]
    outcome = RoundOutcome(round=round_number, participants=[names[n] for n in sampled])
    replied = set()
    for reply in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s):
        node = reply.metadata.src_node_id
        replied.add(node)
        client = names.get(node, f"node-{node}")
        if reply.has_error():
            # Flower's error reason may quote a client's exception (and so its data): keep the code.
            outcome.failures.append(Failure(client=client, error=f"flower_error_{reply.error.code}"))
            continue
        info = dict(reply.content[PRIVACY]) if PRIVACY in reply.content else {}
        status = info.get(STATUS, OK)
        if status != OK:
            code = str(info.get(ERROR, ""))
            code = code if code in FAILURE_CODES else "unknown"
            if status == SAT_OUT:
                outcome.sat_out.append(SatOut(client=client, reason=code))
            else:
                outcome.failures.append(Failure(client=client, error=code))
            continue
        outcome.results[client] = {
            "update": from_array_record(reply.content[UPDATE]),
            "metrics": dict(reply.content[METRICS]),
            "privacy": info,
        }
    for node in sampled:
        if node not in replied:
            outcome.failures.append(Failure(client=names[node], error="no reply before the round timeout"))
    outcome.failures.sort(key=lambda failure: failure.client)  # replies arrive in any order
    return outcome


def aggregate(
    outcome: RoundOutcome, cfg: Config, rng: np.random.Generator
) -> tuple[dict, dict[str, UpdateStats]]:
    """The aggregate delta of the shared part, and per-client update statistics."""
    fed = cfg.federation
    clients = sorted(outcome.results)
    updates = [outcome.results[c]["update"] for c in clients]
    aggregation.check_consistent(updates)
    norms = [aggregation.global_norm(u) for u in updates]
    if fed.update_clip_norm is not None:
        updates = [aggregation.clip_to_norm(u, fed.update_clip_norm) for u in updates]
    elif fed.aggregation != "fedavg":
        # Robust aggregation bounds every update's norm by the median norm, so one scaled-up
        # (poisoned) update cannot dominate the coordinates it survives in.
        bound = float(np.median(norms))
        updates = [aggregation.clip_to_norm(u, bound) for u in updates]
    if fed.aggregation == "median":
        combined = aggregation.coordinate_median(updates)
    elif fed.aggregation == "trimmed_mean":
        combined = aggregation.trimmed_mean(updates, fed.trim_fraction)
    elif fed.update_noise_multiplier > 0:
        # DP-FedAvg weighs clients equally: a size-weighted mean has no fixed sensitivity.
        combined = aggregation.weighted_mean(updates, [1.0] * len(updates))
    else:
        weights = [float(outcome.results[c]["metrics"].get(NUM_EXAMPLES, 1)) for c in clients]
        combined = aggregation.weighted_mean(updates, weights)
    if fed.update_noise_multiplier > 0:
        std = fed.update_noise_multiplier * fed.update_clip_norm / len(updates)
        combined = aggregation.add_gaussian_noise(combined, std, rng)
    mean = aggregation.weighted_mean(updates, [1.0] * len(updates))
    stats = {
        client: UpdateStats(
            norm=norm,
            cosine_to_mean=aggregation.cosine(update, mean),
            num_examples=int(outcome.results[client]["metrics"].get(NUM_EXAMPLES, 0)),
        )
        for client, update, norm in zip(clients, updates, norms, strict=True)
    }
    return combined, stats


def metrics_record(result: dict) -> ClientMetrics:
    """A client's round metrics under the round record's names: whether they were noised, and
    then about how far each released mean loss may be from the true one (``loss_std``)."""
    sent, privacy = result["metrics"], result["privacy"]
    record = ClientMetrics(
        num_examples=sent.get(NUM_EXAMPLES),
        loss_before=sent.get(LOSS_BEFORE),
        loss_after=sent.get(LOSS_AFTER),
        noised=privacy.get("round_metrics", "private") != "exact",
        train_seconds=sent.get(TRAIN_SECONDS),
    )
    needed = (
        record.num_examples,
        record.loss_before,
        privacy.get("round_metrics_loss_clip"),
        privacy.get("round_metrics_noise"),
    )
    if record.noised and None not in needed:
        count, loss, clip, noise = map(float, needed)
        # Loss sums over a sample of this many records (absent: over every record).
        sample = float(privacy.get("round_metrics_sample") or math.inf)
        record.loss_std = released_loss_std(count, loss, clip=clip, noise_multiplier=noise, sample=sample)
    return record


def last_line(error: str) -> str:
    """The gist of a remote traceback: its last non-empty line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def run_rounds(grid: Grid, cfg: Config, adapters: AdapterFiles, on_round=None) -> list[RoundRecord]:
    """Run (or resume) the federation; return the round records written in this run.

    ``adapters``: the fresh (seeded) adapter's weights, the initial shared arrays, and the
    writer of each round's global adapter in PEFT format, from numpy arrays.
    """
    fed = cfg.federation
    root = cfg.data_root
    checkpoint = load_checkpoint(root)
    if checkpoint is not None:
        global_arrays, first_round = checkpoint.arrays, checkpoint.round + 1
        logger.info("resuming after round %d", checkpoint.round)
    else:
        global_arrays, first_round = shared_part(adapters.initial, fed.strategy), 1
    if first_round > fed.rounds:
        logger.info("all %d rounds already done", fed.rounds)
        return []

    # federation.clients unset (`flwr run` without it): every node connected once min_results are.
    expected = fed.clients or fed.min_results
    node_ids = wait_for_nodes(grid, expected, fed.connect_timeout_s)
    if len(node_ids) < fed.min_results:
        raise FederationFailed(
            f"only {len(node_ids)} of {expected} clients connected within "
            f"{fed.connect_timeout_s:.0f} s; federation.min_results is {fed.min_results}"
        )
    names = identify_nodes(grid, node_ids, fed.round_timeout_s)
    node_ids = sorted(names)
    per_round = min(fed.clients_per_round or len(node_ids), len(node_ids))
    records = []
    for round_number in range(first_round, fed.rounds + 1):
        started = time.perf_counter()
        # OS entropy: who is sampled and the aggregate's noise must stay unknown to outsiders
        # (amplification by sampling; noise that could be regenerated could be subtracted).
        rng = np.random.default_rng()
        sampled = sample_nodes(node_ids, per_round, rng)
        outcome = collect_round(grid, round_number, sampled, names, global_arrays, cfg)
        record, delta = close_round(outcome, cfg, rng, population=len(node_ids), started=started)
        if delta is None:
            write_round_record(root, record)
            raise FederationFailed(failure_message(record, fed.min_results))
        global_arrays = {
            name: (global_arrays[name] + delta[name]).astype(np.float32) for name in global_arrays
        }
        for directory in (round_adapter_dir(root, round_number), global_adapter_dir(root)):
            adapters.save(global_arrays, directory, round=round_number, source="federated")
        write_round_record(root, record)
        save_checkpoint(root, round_number, global_arrays, {"strategy": fed.strategy})
        records.append(record)
        if on_round is not None:
            on_round(record)
        logger.info(
            "round %d: %d results, %d failures, %d sat out",
            round_number,
            len(outcome.results),
            len(outcome.failures),
            len(outcome.sat_out),
        )
    return records


def close_round(
    outcome: RoundOutcome, cfg: Config, rng: np.random.Generator, *, population: int, started: float
) -> tuple[RoundRecord, dict[str, np.ndarray] | None]:
    """The round's record and the aggregate delta of the shared part. With fewer results than
    ``federation.min_results`` the record's status is "failed" and there is no delta.

    ``population``: the clients that could have been sampled; ``started``: the round's start
    (``time.perf_counter()``), for the record's duration.
    """
    fed = cfg.federation
    record = RoundRecord(
        round=outcome.round,
        strategy=fed.strategy,
        aggregation=fed.aggregation,
        participants=outcome.participants,
        results=sorted(outcome.results),
        failures=outcome.failures,
        sat_out=outcome.sat_out,
    )
    if len(outcome.results) < fed.min_results:
        record.status = "failed"
        return record, None
    delta, record.updates = aggregate(outcome, cfg, rng)
    record.aggregate_norm = aggregation.global_norm(delta)
    record.metrics = {c: metrics_record(r) for c, r in outcome.results.items()}
    record.server_dp = server_dp_record(cfg, len(outcome.participants), population, outcome.round)
    record.seconds = time.perf_counter() - started
    return record, delta


def failure_message(record: RoundRecord, min_results: int) -> str:
    details = "; ".join(f"{f.client}: {last_line(f.error)}" for f in record.failures) or "none"
    sat = ", ".join(s.client for s in record.sat_out) or "none"
    return (
        f"round {record.round}: {len(record.results)} results, {len(record.failures)} failures "
        f"(federation.min_results = {min_results}). Failed: {details}. Sat out: {sat}"
    )


def server_dp_record(cfg: Config, sampled: int, population: int, rounds_done: int) -> ServerDP:
    fed = cfg.federation
    if fed.update_noise_multiplier <= 0:
        return ServerDP(noise_multiplier=0.0, clip_norm=fed.update_clip_norm, epsilon=None)
    delta = 1.0 / max(population, 2) ** 1.1
    epsilon = aggregation.client_level_epsilon(
        fed.update_noise_multiplier, sampled=sampled, population=population, rounds=rounds_done, delta=delta
    )
    return ServerDP(
        noise_multiplier=fed.update_noise_multiplier,
        clip_norm=fed.update_clip_norm,
        epsilon=epsilon,
        delta=delta,
    )
