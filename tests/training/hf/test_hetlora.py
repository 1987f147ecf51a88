"""Heterogeneous LoRA ranks (HetLoRA's zero-padding): the sites' truncate/pad and the server's own FedAvg aggregation.

The expected global adapter is computed here from the paper's formula, rank component by rank component;
the actual one goes through fedllm's site functions and the server's real aggregation (LeanFedAvg's
in-time weighted average, as in production).
"""

from __future__ import annotations

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

from fedllm.flare.fedavg import LeanFedAvg
from fedllm.training.hf.hetlora import LoraRankError, adapter_rank, pad_adapter, rank_dim, truncate_adapter

# PEFT's adapter state-dict keys for GPT-2's c_attn (what LoraAdapterWeights and the sites exchange).
LAYERS = [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)]
IN, OUT = 96, 288


def _adapter(rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for layer in LAYERS:
        out[f"{layer}.lora_A.weight"] = torch.randn(rank, IN, generator=gen)
        out[f"{layer}.lora_B.weight"] = torch.randn(OUT, rank, generator=gen)
    return out


def _server_average(results: dict[str, tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The server's FedAvg of one round: LeanFedAvg's own in-time aggregation of each site's result."""
    controller = LeanFedAvg(num_clients=len(results), num_rounds=1)
    # What FedAvg.run() sets up at the start of each round.
    controller._aggr_helper = WeightedAggregationHelper(exclude_vars=controller.exclude_vars)
    controller._aggr_metrics_helper = WeightedAggregationHelper()
    controller.current_round, controller._expected_count = 0, len(results)
    for site, (params, examples) in results.items():
        sent = FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": examples, "client_name": site})
        assert controller._aggregate_one_result(sent)
    return controller._get_aggregated_result().params


def _one_round(ranks: dict[str, int], examples: dict[str, int], seed: int = 0):
    """(global sent, each site's trained adapter, the server's aggregate): sites truncate, train, pad."""
    gen = torch.Generator().manual_seed(seed)
    sent = _adapter(max(ranks.values()), gen)
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    trained, results = {}, {}
    for site, rank in ranks.items():
        local = truncate_adapter(sent, rank, site)
        assert adapter_rank(local) == rank
        # "Training": a random adapter of the site's rank, starting from what it received.
        trained[site] = {k: v + torch.randn(v.shape, generator=gen) for k, v in local.items()}
        results[site] = (pad_adapter(trained[site], shapes), examples[site])
    return sent, trained, _server_average(results)


def test_the_aggregate_is_hetlora_zero_padding_of_the_sites_adapters() -> None:
    ranks = {"site-1": 16, "site-2": 8, "site-3": 4}
    examples = {"site-1": 40, "site-2": 24, "site-3": 56}
    _, trained, aggregate = _one_round(ranks, examples)
    total = sum(examples.values())
    for layer in LAYERS:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        assert aggregate[a].shape == (16, IN) and aggregate[b].shape == (OUT, 16)
        for i in range(16):
            # Rank component i: the sites that have it, weighted by their examples, over ALL sites' examples.
            have = [s for s, r in ranks.items() if r > i]
            expected_a = sum(examples[s] * trained[s][a][i] for s in have) / total
            expected_b = sum(examples[s] * trained[s][b][:, i] for s in have) / total
            torch.testing.assert_close(aggregate[a][i], expected_a, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(aggregate[b][:, i], expected_b, rtol=1e-6, atol=1e-6)
    # Each site gets the aggregate at its rank: its first r_k components.
    for site, rank in ranks.items():
        own = truncate_adapter(aggregate, rank, site)
        for layer in LAYERS:
            assert torch.equal(own[f"{layer}.lora_A.weight"], aggregate[f"{layer}.lora_A.weight"][:rank])
            assert torch.equal(own[f"{layer}.lora_B.weight"], aggregate[f"{layer}.lora_B.weight"][:, :rank])


def test_equal_ranks_are_plain_fedavg_bit_for_bit() -> None:
    ranks = {"site-1": 8, "site-2": 8, "site-3": 8}
    examples = {"site-1": 40, "site-2": 24, "site-3": 56}
    sent, trained, aggregate = _one_round(ranks, examples, seed=1)
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    # Truncation and padding hand back the very tensors: nothing is copied, cast or reordered.
    assert all(truncate_adapter(sent, 8)[k] is v for k, v in sent.items())
    assert all(pad_adapter(trained["site-2"], shapes)[k] is v for k, v in trained["site-2"].items())
    plain = _server_average({site: (trained[site], examples[site]) for site in ranks})
    assert set(plain) == set(aggregate)
    assert all(torch.equal(plain[k], aggregate[k]) for k in plain)


def test_a_global_adapter_below_the_sites_rank_is_refused_with_the_fix() -> None:
    sent = _adapter(4, torch.Generator().manual_seed(2))
    with pytest.raises(LoraRankError) as info:
        truncate_adapter(sent, 8, "site-1")
    message = str(info.value)
    assert "site-1" in message and "rank 4" in message and "lora_r 8" in message
    assert "--lora-ranks" in message and "at most 4" in message


def test_padding_is_zeros_beyond_the_sites_rank_in_numpy_too() -> None:
    trained = {k: v.numpy() for k, v in _adapter(4, torch.Generator().manual_seed(3)).items()}
    a, b = f"{LAYERS[0]}.lora_A.weight", f"{LAYERS[0]}.lora_B.weight"
    padded = pad_adapter(trained, {a: (16, IN), b: (OUT, 16)})
    assert padded[a].shape == (16, IN) and padded[b].shape == (OUT, 16)
    assert (padded[a][:4] == trained[a]).all() and not padded[a][4:].any()
    assert (padded[b][:, :4] == trained[b]).all() and not padded[b][:, 4:].any()
    assert padded[f"{LAYERS[1]}.lora_A.weight"] is trained[f"{LAYERS[1]}.lora_A.weight"]  # no shape given: as is


@pytest.mark.parametrize(
    ("key", "dim"),
    [
        ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", 0),
        ("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", 1),
        ("base_model.model.model.embed_tokens.lora_embedding_A", 0),
        ("base_model.model.model.embed_tokens.lora_embedding_B", 1),
        ("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", None),
        ("base_model.model.score.weight", None),
    ],
)
def test_the_rank_dimension_of_peft_keys(key: str, dim: int | None) -> None:
    assert rank_dim(key) == dim


def test_a_rank_4_site_loads_the_rank_16_global_and_answers_at_rank_16_through_nvflares_own_calls(
    tiny_gpt, tmp_path
) -> None:
    """The site's PEFT model (rank 4) through NVFlare's HF integration's load_params / extract_params."""
    from nvflare.app_opt.hf import utils as nvflare_hf

    from fedllm.flare.server_models import LoraAdapterWeights
    from fedllm.training.hf.sft import build_trainer, parser

    sent = {k: v + 0.01 for k, v in LoraAdapterWeights(str(tiny_gpt), r=16, alpha=32).state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    args = parser("lora").parse_args(
        ["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--lora-r", "4", "--lora-alpha", "8"]
    )
    args.model_path = str(tiny_gpt)
    pairs = [{"input": "Profit rose . sentiment:", "output": "positive"}] * 4
    trainer = build_trainer(args, "lora", pairs, pairs, tmp_path / "trainer")
    with pytest.raises(RuntimeError, match="shape"):  # what NVFlare does with the rank-16 adapter as it is
        nvflare_hf.load_params(trainer, sent, params_scope="adapter")
    nvflare_hf.load_params(trainer, truncate_adapter(sent, 4, "site-3"), params_scope="adapter")
    back = nvflare_hf.extract_params(trainer, params_scope="adapter")
    assert set(back) == set(sent) and adapter_rank(back) == 4
    for key, value in back.items():
        assert torch.equal(value, sent[key][:4] if rank_dim(key) == 0 else sent[key][:, :4])
    padded = pad_adapter(back, shapes)
    assert {k: tuple(v.shape) for k, v in padded.items()} == shapes


@pytest.mark.parametrize(("transfer", "rank"), [("FULL", 4), ("DIFF", 4), ("FULL", 16)])
def test_the_sites_client_api_truncates_what_it_receives_and_pads_what_it_sends(transfer: str, rank: int) -> None:
    """RankAdaptingClientAPI around NVFlare's real in-process Client API, fed and drained through its data bus."""
    from nvflare.app_common.abstract.fl_model import FLMetaKey
    from nvflare.client.config import ConfigKey, ExchangeFormat
    from nvflare.client.in_process.api import TOPIC_LOCAL_RESULT, InProcessClientAPI
    from nvflare.fuel.data_event.data_bus import DataBus

    api = InProcessClientAPI(
        {FLMetaKey.JOB_ID: "job", FLMetaKey.SITE_NAME: "site-3", ConfigKey.TASK_NAME: "train"}, 0.02
    )
    pytorch = ExchangeFormat.PYTORCH
    api.init(
        rank="0",
        config={
            ConfigKey.TASK_EXCHANGE: {
                ConfigKey.EXCHANGE_FORMAT: pytorch,
                ConfigKey.SERVER_EXPECTED_FORMAT: pytorch,
                ConfigKey.TRANSFER_TYPE: transfer,
            }
        },
    )
    results: list = []

    def collect(_topic, data, _bus) -> None:
        results.append(data)

    bus = DataBus()  # the process's one bus: the test's subscription goes when it ends
    bus.subscribe([TOPIC_LOCAL_RESULT], collect)
    try:
        _exchange_one_round(api, bus, results, transfer, rank)
    finally:
        bus.unsubscribe(TOPIC_LOCAL_RESULT, collect)
        api.shutdown()


def _exchange_one_round(api, bus, results: list, transfer: str, rank: int) -> None:
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.client.in_process.api import TOPIC_GLOBAL_RESULT

    from fedllm.training.hf.hetlora import RankAdaptingClientAPI

    told: list[str] = []
    site = RankAdaptingClientAPI(api, rank, "site-3", log=told.append)

    sent = _adapter(16, torch.Generator().manual_seed(4))
    bus.publish([TOPIC_GLOBAL_RESULT], FLModelUtils.to_shareable(FLModel(params=sent, current_round=0)))
    received = site.receive(timeout=10)
    assert site.receive() is received  # the task is held until answered: the same truncated model
    assert adapter_rank(received.params) == rank and adapter_rank(api.fl_model.params) == 16  # NVFlare's untouched
    if rank == 16:  # the global adapter's own rank: the very tensors, and nothing to tell
        assert all(received.params[k] is v for k, v in api.fl_model.params.items()) and not told
    else:
        assert told == [
            "[site-3] LoRA rank 4 of the global adapter's 16 (HetLoRA): this site trains the first 4 rank "
            "components and sends them back zero-padded to rank 16"
        ]
    assert site.get_site_name() == "site-3"  # everything else goes to NVFlare's API

    trained = {k: v * 2 for k, v in received.params.items()}
    site.send(FLModel(params=trained, meta={"NUM_STEPS_CURRENT_ROUND": 8}))
    assert len(results) == 1
    back = FLModelUtils.from_shareable(results[0]).params
    for key, value in back.items():
        assert tuple(value.shape) == tuple(sent[key].shape)
        full = pad_adapter({key: trained[key]}, {key: tuple(sent[key].shape)})[key]
        assert torch.equal(value, full - sent[key] if transfer == "DIFF" else full)
        assert not (full[:, rank:] if rank_dim(key) == 1 else full[rank:]).any()  # zeros beyond the site's rank
