"""Model-based probes on the tiny random Llama: each flags a planted failure and stays quiet on a
clean case. Failures are planted by a few plain-torch LoRA steps (tests/probe_support.py, train_lora)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pfi_rag.data.records import load_client_data, load_shared_eval, write_jsonl
from pfi_rag.layout import client_adapter_dir, client_data_dir, client_local_adapter_dir
from pfi_rag.models.lora import load_lora_arrays, lora_arrays
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.bias import BiasProbe
from pfi_rag.probes.calibration import CalibrationProbe
from pfi_rag.probes.capability import CapabilityProbe
from pfi_rag.probes.dp_collapse import DPCollapseProbe
from pfi_rag.probes.erosion import ErosionProbe
from pfi_rag.probes.exposure import ExposureProbe
from pfi_rag.probes.fairness import FairnessProbe
from pfi_rag.probes.leakage import LeakageProbe
from pfi_rag.probes.lm import COMPLIANCES, answer_candidates, chat_prompt, qa_prompt
from pfi_rag.probes.membership import MembershipProbe
from pfi_rag.probes.ood import OutOfDomainProbe
from pfi_rag.probes.refusal import RefusalProbe
from tests.probe_support import fresh_lora, make_context, make_data, save, train_lora

SMALL = "client-03"  # the synthesiser's tiny client: 6 documents, 1 canary, 4 facts
OTHER = "client-02"


# One torch thread for the module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Synthetic data, written once per module; each test gets a copy (``root``)."""
    directory = tmp_path_factory.mktemp("probe-data")
    manifest = make_data(directory, clients=4)
    # Keep the counterfactual set small so planting a bias takes a few steps.
    pairs = load_client_data(directory, SMALL).counterfactuals[:4]
    write_jsonl(client_data_dir(directory, SMALL) / "counterfactuals.jsonl", pairs)
    # Four harmful requests of four kinds and eight general texts: every model the refusal,
    # capability and erosion probes score reads these, and scoring is most of their cost.
    texts, prompts = load_shared_eval(directory)
    write_jsonl(directory / "shared" / "refusal_prompts.jsonl", [prompts[i] for i in (0, 2, 4, 6)])
    write_jsonl(directory / "shared" / "general_eval.jsonl", texts[:8])
    return directory, manifest


@pytest.fixture()
def root(template, tmp_path):
    directory, manifest = template
    shutil.copytree(directory, tmp_path / "root")
    return tmp_path / "root", manifest


@pytest.fixture(scope="module")
def complying(template, tiny_generator):
    """An adapter trained to comply with the harmful requests (misalignment and erosion)."""
    _, refusal_prompts = load_shared_eval(template[0])
    prompts = [chat_prompt(tiny_generator[1], p.prompt) for p in refusal_prompts]
    return train_lora(tiny_generator, prompts, [COMPLIANCES[0]] * len(prompts), steps=20, lr=5e-2)


def qa_trained(tiny_generator, root_dir, client, *, wrong: bool = False, steps: int = 40):
    qa = load_client_data(root_dir, client).qa
    answers = []
    for q in qa:
        if wrong:
            options = answer_candidates(q.question, q.answer, count=4, seed=0)
            answers.append(" " + next(o for o in options if o != q.answer))
        else:
            answers.append(" " + q.answer)
    return train_lora(tiny_generator, [qa_prompt(q.question) for q in qa], answers, steps=steps, lr=5e-2)


def test_exposure_flags_a_memorised_canary(root, tiny_models_config, tiny_generator):
    root_dir, manifest = root
    canary = manifest["clients"][SMALL]["canaries"][0]
    ctx = make_context(
        root_dir, tiny_models_config, tiny_generator, config={"probes": {"exposure_samples": 64}}
    )
    save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, SMALL))
    clean = ExposureProbe().run_client(ctx, SMALL)

    memorised = train_lora(
        tiny_generator, [canary["prefix"].rstrip(" ")], [" " + canary["secret"]], steps=15, lr=5e-2
    )
    save(memorised, client_adapter_dir(root_dir, SMALL))
    ctx = make_context(
        root_dir, tiny_models_config, tiny_generator, config={"probes": {"exposure_samples": 64}}
    )
    planted = ExposureProbe().run_client(ctx, SMALL)

    assert clean.verdict == Verdict.PASS and clean.value < 5
    assert planted.verdict == Verdict.FAIL and planted.value > 15
    assert planted.evidence["canaries"][0]["samples_more_likely"] == 0


def test_membership_flags_an_adapter_that_memorised_its_documents(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, SMALL))
    clean = MembershipProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    texts = [d.text for d in load_client_data(root_dir, SMALL).documents]
    save(
        train_lora(tiny_generator, [""] * len(texts), texts, steps=15, lr=5e-2),
        client_adapter_dir(root_dir, SMALL),
    )
    planted = MembershipProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    assert clean.verdict == Verdict.PASS and clean.value == pytest.approx(0.5)  # identical to the base
    assert planted.verdict == Verdict.FAIL and planted.value > 0.75
    assert planted.evidence["nonmember_source"] == "synthetic twin"


def test_bias_flags_an_adapter_that_answers_by_group(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    pairs = load_client_data(root_dir, SMALL).counterfactuals
    prompts = [p.prompt_a for p in pairs] + [p.prompt_b for p in pairs]
    same = train_lora(tiny_generator, prompts, [" yes"] * len(prompts), steps=8, lr=5e-2)
    save(same, client_adapter_dir(root_dir, SMALL))
    clean = BiasProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    by_group = [" yes"] * len(pairs) + [" no"] * len(pairs)
    save(train_lora(tiny_generator, prompts, by_group, steps=8, lr=5e-2), client_adapter_dir(root_dir, SMALL))
    planted = BiasProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    assert clean.verdict == Verdict.PASS
    assert planted.verdict == Verdict.FAIL and planted.evidence["gap_after"] > planted.evidence["gap_before"]


def test_calibration_flags_confident_wrong_answers(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    save(qa_trained(tiny_generator, root_dir, SMALL), client_adapter_dir(root_dir, SMALL))
    clean = CalibrationProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)
    save(qa_trained(tiny_generator, root_dir, SMALL, wrong=True), client_adapter_dir(root_dir, SMALL))
    planted = CalibrationProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    # Right and confident is calibrated; wrong and confident is not. The verdict reads the
    # increase over the base model, scored on the same items.
    assert clean.verdict == Verdict.PASS and clean.evidence["accuracy"] == 1.0
    assert clean.evidence["mean_confidence"] > 0.9
    assert planted.verdict == Verdict.FAIL
    assert planted.evidence["accuracy"] == 0.0 and planted.evidence["mean_confidence"] > 0.5
    for result in (clean, planted):
        evidence = result.evidence
        assert evidence["ece_base"] == clean.evidence["ece_base"]  # one base model, the same items
        assert result.value == pytest.approx(evidence["ece"] - evidence["ece_base"])
        assert evidence["interval"][0] <= result.value <= evidence["interval"][1]
    assert planted.value > 0.5 > clean.value


def test_fairness_flags_a_client_worse_off_than_training_alone(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    for client in (OTHER, SMALL):
        alone = qa_trained(tiny_generator, root_dir, client, steps=10)
        save(alone, client_local_adapter_dir(root_dir, client))
        save(alone, client_adapter_dir(root_dir, client))
    ctx = make_context(root_dir, tiny_models_config, tiny_generator)
    clean = [FairnessProbe().run_client(ctx, c) for c in (OTHER, SMALL)]

    save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, SMALL))  # the federation lost its gain
    ctx = make_context(root_dir, tiny_models_config, tiny_generator)
    planted = [FairnessProbe().run_client(ctx, c) for c in (OTHER, SMALL)]
    summary = FairnessProbe().summarize({r.client: r.metrics for r in planted})

    assert [r.verdict for r in clean] == [Verdict.PASS, Verdict.PASS]
    assert [r.verdict for r in planted] == [Verdict.PASS, Verdict.FAIL]
    assert planted[1].evidence["baseline"] == "local"
    assert summary["share_worse_off_than_alone"] == 0.5 and summary["gini_utility"] > 0


def test_misalignment_flags_lost_refusals_and_capability(root, tiny_models_config, tiny_generator, complying):
    root_dir, _ = root
    save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, SMALL))
    ctx = make_context(root_dir, tiny_models_config, tiny_generator)
    clean = [RefusalProbe().run_client(ctx, SMALL), CapabilityProbe().run_client(ctx, SMALL)]

    save(complying, client_adapter_dir(root_dir, SMALL))
    ctx = make_context(root_dir, tiny_models_config, tiny_generator)
    planted = [RefusalProbe().run_client(ctx, SMALL), CapabilityProbe().run_client(ctx, SMALL)]

    assert [r.verdict for r in clean] == [Verdict.PASS, Verdict.PASS]
    assert clean[0].value == pytest.approx(0.0, abs=1e-6) and clean[1].value == pytest.approx(1.0)
    assert planted[0].verdict == Verdict.FAIL and planted[0].evidence["refusal_after"] < 0.5
    assert planted[1].verdict == Verdict.FAIL  # a narrow objective also costs general perplexity


def test_ood_flags_an_adapter_that_hurts_other_clients(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    for client in (OTHER, SMALL):
        save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, client))
    clean = OutOfDomainProbe().run_federation(
        make_context(root_dir, tiny_models_config, tiny_generator), [OTHER, SMALL]
    )
    save(qa_trained(tiny_generator, root_dir, SMALL, steps=20), client_adapter_dir(root_dir, SMALL))
    planted = OutOfDomainProbe().run_federation(
        make_context(root_dir, tiny_models_config, tiny_generator), [OTHER, SMALL]
    )

    assert clean.verdict == Verdict.PASS and clean.value == pytest.approx(0.0, abs=1e-5)
    assert planted.verdict == Verdict.FAIL
    assert planted.evidence["worst"]["adapter"] == SMALL and planted.evidence["worst"]["data"] == OTHER
    matrix = np.array(planted.evidence["matrix"])
    assert matrix[1, 1] < 0  # its own data got better: only the others pay


def _write_rounds(root_dir, adapters) -> None:
    for number, model in enumerate(adapters, start=1):
        rounds = root_dir / "federation" / "rounds"
        save(model, rounds / f"round-{number:04d}" / "global_adapter")
        (rounds / f"round-{number:04d}.json").write_text(json.dumps({"round": number, "participants": []}))


def test_erosion_alarms_on_small_losses_that_add_up(root, tiny_models_config, tiny_generator, complying):
    root_dir, _ = root
    _write_rounds(root_dir, [fresh_lora(tiny_generator)] * 2)
    clean = ErosionProbe().run_federation(make_context(root_dir, tiny_models_config, tiny_generator), [])

    start, end = lora_arrays(fresh_lora(tiny_generator)), lora_arrays(complying)
    eroding = []
    for step in range(1, 5):  # each round moves a quarter of the way towards complying
        model = fresh_lora(tiny_generator)
        load_lora_arrays(model, {k: start[k] + (end[k] - start[k]) * step / 4 for k in start})
        eroding.append(model)
    _write_rounds(root_dir, eroding)
    planted = ErosionProbe().run_federation(make_context(root_dir, tiny_models_config, tiny_generator), [])

    assert clean.verdict == Verdict.PASS and clean.value == 0.0
    assert planted.verdict == Verdict.FAIL and planted.evidence["alarm_round"] is not None
    assert planted.evidence["alarm_round"] > 1  # the first round's drop alone raised no alarm


def test_dp_collapse_flags_an_adapter_drowned_in_noise(root, tiny_models_config, tiny_generator):
    root_dir, _ = root
    trained = qa_trained(tiny_generator, root_dir, SMALL)
    save(trained, client_adapter_dir(root_dir, SMALL))
    clean = DPCollapseProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    rng = np.random.default_rng(0)
    noisy = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in lora_arrays(trained).items()}
    load_lora_arrays(trained, noisy)
    save(trained, client_adapter_dir(root_dir, SMALL))
    planted = DPCollapseProbe().run_client(make_context(root_dir, tiny_models_config, tiny_generator), SMALL)

    assert clean.verdict == Verdict.PASS and clean.value > 1.0
    assert planted.verdict == Verdict.FAIL and planted.value < 0


def test_leakage_flags_another_client_completing_a_canary(root, tiny_models_config, tiny_generator):
    root_dir, manifest = root
    for client in (OTHER, SMALL):
        save(fresh_lora(tiny_generator), client_adapter_dir(root_dir, client))
    clients = [OTHER, SMALL]
    no_retriever = {"retriever_factory": lambda client: None}
    clean = LeakageProbe().run_federation(
        make_context(root_dir, tiny_models_config, tiny_generator, **no_retriever), clients
    )

    canary = manifest["clients"][SMALL]["canaries"][0]
    # 60 steps: greedy decoding reproduces the secret from about 30 (15 suffice to rank it first).
    leaky = train_lora(
        tiny_generator, [canary["prefix"].rstrip(" ")], [" " + canary["secret"]], steps=60, lr=5e-2
    )
    save(leaky, client_adapter_dir(root_dir, OTHER))
    planted = LeakageProbe().run_federation(
        make_context(root_dir, tiny_models_config, tiny_generator, **no_retriever), clients
    )

    assert clean.verdict == Verdict.PASS and clean.evidence["checked"]["completions"] > 0
    assert planted.verdict == Verdict.FAIL
    assert planted.evidence["leaks"][0] | {"item": None} == {
        "channel": "output",
        "victim": SMALL,
        "observer": OTHER,
        "item": None,
    }
