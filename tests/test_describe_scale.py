"""Scale plan figures of `moe_jax.describe`: mesh search, step time, communication.

Everything here is arithmetic on abstract shapes (no compilation), checked
against values worked out by hand in the comments.
"""

import json
import re

import gin
import pytest

from moe_jax import config
from moe_jax import describe
from moe_jax import partitioning

# tiny_moe: d_model 32, 4 heads x 8, d_ff 64 (gated GELU, 3 matrices), 2+2
# layers with one MoE layer per stack (4 experts, top-2, cf 1.25, groups of
# at most 64 tokens, minimum capacity 4), bfloat16 activations.
TINY_MOE = ["gin/models/tiny_moe.gin"]


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def tiny():
  # The MoE layer factories read gin when called: load after clear_gin.
  model = config.load_model(TINY_MOE)
  return model, describe.abstract_variables(model.module)


def _mesh(data, expert, model):
  return {"data": data, "expert": expert, "model": model}


def test_accelerator_table():
  # Dense bf16 peaks and HBM from the vendors' pages named in describe.py.
  expected = {"v4": (275e12, 32 * 2**30), "v5p": (459e12, 95e9), "v5e": (197e12, 16e9),
              "v6e": (918e12, 32e9), "h100": (989e12, 80e9), "h200": (989e12, 141e9),
              "a100": (312e12, 80e9)}
  for name, (peak, hbm) in expected.items():
    chip = describe.accelerator(name.upper())
    assert (chip.peak_flops, chip.hbm_bytes) == (peak, hbm)
  with pytest.raises(ValueError, match="Unknown accelerator 'tpu9'"):
    describe.accelerator("tpu9")


def test_step_time_is_flops_over_chips_peak_mfu(tiny):
  model, variables = tiny
  lengths, batch = (32, 4), 8
  figures = describe.describe(model, lengths=lengths)
  rules = partitioning.standard_logical_axis_rules()
  chip = describe.accelerator("v5e")
  mesh = _mesh(2, 2, 2)
  estimate = describe.step_estimate(model.module, variables, figures, mesh, batch, lengths,
                                    chip, 0.5, "adafactor", rules, remat_policy="none")
  flops = 3 * batch * figures["forward_flops_per_sequence"]
  assert estimate["model_flops_per_step"] == estimate["executed_flops_per_step"] == flops
  assert estimate["step_time_s"] == pytest.approx(flops / (8 * 197e12 * 0.5), rel=1e-12)
  assert estimate["tokens_per_step"] == 8 * (32 + 4)
  assert estimate["tokens_per_day"] == pytest.approx(
      288 * 86400 / estimate["step_time_s"], rel=1e-12)
  assert estimate["model_flops_utilization"] == 0.5
  # Full remat executes the forward pass twice: 4 x forward, 4/3 the time.
  remat = describe.step_estimate(model.module, variables, figures, mesh, batch, lengths,
                                 chip, 0.5, "adafactor", rules, remat_policy="full")
  assert remat["executed_flops_per_step"] == 4 * batch * figures["forward_flops_per_sequence"]
  assert remat["step_time_s"] == pytest.approx(estimate["step_time_s"] * 4 / 3, rel=1e-12)
  assert remat["model_flops_utilization"] == pytest.approx(0.375)
  assert remat["memory"]["activation_bytes"] < estimate["memory"]["activation_bytes"]
  assert describe.step_time_seconds(1e15, 4, 1e12, 0.25) == pytest.approx(1000.0)
  with pytest.raises(ValueError, match="--mfu must lie in"):
    describe.step_time_seconds(1e15, 4, 1e12, 1.5)


def test_all_to_all_bytes_by_hand(tiny):
  model, _ = tiny
  module = model.module
  mesh = _mesh(1, 2, 1)
  # batch 4, lengths (32, 4); data x expert = 2 shards, 2 sequences per chip.
  # Encoder: 128 tokens -> ceil(128 / 64) = 2 groups (a multiple of 2) of 64;
  #   C = max(round(1.25 * 64 / 4), 4) = 20 -> r = 4 * 20 / 64 = 1.25 rows per
  #   token; T_dev = 2 * 32 = 64: 4 * 64 * 1.25 * 32 * 2 bytes = 20480.
  # Decoder: 16 tokens -> 1 group, rounded up to 2 groups of 8; C = max(round(
  #   1.25 * 8 / 4), 4) = 4 (the floor) -> r = 4 * 4 / 8 = 2; T_dev = 2 * 4 = 8:
  #   4 * 8 * 2 * 32 * 2 = 4096.
  assert describe.all_to_all_bytes(module, mesh, 4, (32, 4)) == 20480 + 4096
  # A recomputed forward pass sends dispatch and combine once more: 6 / 4.
  assert describe.all_to_all_bytes(module, mesh, 4, (32, 4), "full") == 6 * (20480 + 4096) // 4
  # Without an expert axis no all-to-all.
  assert describe.all_to_all_bytes(module, _mesh(2, 1, 1), 4, (32, 4)) == 0


def test_rows_per_token_use_the_global_group_rule():
  # Flan-ST-32B fine-tuning: batch 32 x 2048 on data=1, expert=32: 65536 tokens
  # -> 16 groups of 4096, rounded up to 32 groups of 2048; C = round(1.25 *
  # 2048 / 64) = 40 -> 64 * 40 / 2048 = 1.25 rows per token (grouping one
  # chip's 2048 tokens into 32 groups of 64 would hit the capacity floor 4:
  # 4 rows per token).
  model = config.load_model(["gin/models/flan_st_32b.gin"])
  mesh = _mesh(1, 32, 8)
  layer = describe._sparse_layer(model.module.encoder_sparse_mlp, mesh)
  assert describe._routed_rows_per_token(layer, mesh, 32, 2048) == 1.25


def test_gradient_sync_bytes_by_hand():
  mesh = _mesh(2, 2, 2)
  # An [8, 4] kernel sharded over model on its second axis: 16 local elements,
  # replicated over data x expert = 4: ring all-reduce 2 * 3/4 * 16 * 4 bytes.
  replicated = [("w", (8, 4), ("embed", "mlp"), ((), ("model",)))]
  assert describe.gradient_sync_bytes(replicated, mesh) == 96
  # Also sharded over data (2-D parameter partitioning): 8 local elements,
  # all-reduced over expert (2 * 1/2 * 8 * 4 = 32) plus all-gathered over data
  # for the forward and backward passes and reduce-scattered: 3 * 1 * 8 * 4.
  fsdp = [("w", (8, 4), ("embed", "mlp"), (("data",), ("model",)))]
  assert describe.gradient_sync_bytes(fsdp, mesh) == 32 + 96
  assert describe.gradient_sync_bytes(fsdp, mesh, "full") == 32 + 128


def test_tensor_parallel_bytes(tiny):
  model, _ = tiny
  module = model.module
  assert describe.tensor_parallel_bytes(module, _mesh(4, 1, 1), 4, (32, 4)) == 0
  # data=2, model=2, batch 4, lengths (32, 4): 2 sequences per chip. Blocks
  # whose output is all-reduced over model, in rows of d_model per token:
  # encoder 2 attentions + 1 dense FFN + 1 expert FFN over r = 1.25 rows (2
  # groups of 64, C = 20) = 4.25; decoder 2 x 2 attentions + 1 dense FFN + 1
  # expert FFN over r = 2 rows (2 groups of 8, C = 4) = 7. Rows per chip:
  # 2 * 32 * 4.25 + 2 * 4 * 7 = 328; forward + backward, ring 2 * (2-1)/2 = 1,
  # d_model 32, 2 bytes: 2 * 328 * 32 * 2 = 41984.
  mesh = _mesh(2, 1, 2)
  expected = 41984
  assert describe.tensor_parallel_bytes(module, mesh, 4, (32, 4)) == expected


def test_plan_returns_a_valid_mesh_for_a_small_config(tiny):
  model, variables = tiny
  chip = describe.accelerator("v5e")
  # 8 chips, batch 4: expert in {1, 2, 4} (4 experts), model in {1, 2, 4} (4
  # heads, d_ff 64), data * expert dividing 4 -> model >= 2: (e, m) in
  # (1, 2), (1, 4), (2, 2), (2, 4), (4, 2): 5 meshes.
  plan = describe.plan_mesh(model, 8, chip, 4, (32, 4), mfu=0.5, variables=variables)
  assert plan["considered"] == 5
  best = plan["best"]
  mesh = best["mesh"]
  assert mesh["data"] * mesh["expert"] * mesh["model"] == 8
  assert 4 % mesh["expert"] == 0 and 4 % mesh["model"] == 0
  assert 4 % (mesh["data"] * mesh["expert"]) == 0
  assert best["fits"] and best["remat_policy"] == "none"  # A tiny model fits without remat.
  # Every candidate has the same FLOPs, so the winner moves the fewest bytes.
  for alternative in plan["alternatives"]:
    assert (alternative["step_time_s"], alternative["communication_bytes_per_chip"]) >= (
        best["step_time_s"], best["communication_bytes_per_chip"])
  # Batch 8 lets every factorization of 8 with expert, model in {1, 2, 4} in.
  assert describe.plan_mesh(model, 8, chip, 8, (32, 4), variables=variables)["considered"] == 8


def test_plan_refuses_clearly(tiny):
  model, variables = tiny
  chip = describe.accelerator("v5e")
  with pytest.raises(ValueError, match=r"Nothing fits: no mesh of 8 x v5e .* needs"):
    describe.plan_mesh(model, 8, chip, 8, (32, 4), memory_fraction=1e-6, variables=variables)
  # 3 chips: 3 divides neither the experts, the heads nor the batch.
  with pytest.raises(ValueError, match="No \\(data, expert, model\\) mesh of 3 chips"):
    describe.plan_mesh(model, 3, chip, 8, (32, 4), variables=variables)


def test_mixtral_anchor_reproduces_maxtext_throughput():
  # MaxText docs: Mixtral 8x7B at 54.89% MFU on v5p-128 = 251.94 TFLOP/s per
  # chip; tiering table: 52.56% on 256 v5p chips (sequence 4096) = ~2,909
  # tokens/s/device, 35.23% on 256 v6e = ~3,899 (attention counted non-causal).
  flops = describe.decoder_only_flops_per_token(seq_len=4096, **describe.MIXTRAL_8X7B)
  v5p, v6e = describe.accelerator("v5p"), describe.accelerator("v6e")
  assert describe.throughput_at(flops, v5p, 64, 0.5489)["flops_per_second_per_chip"] == (
      pytest.approx(251.94e12, rel=1e-4))
  assert describe.throughput_at(flops, v5p, 256, 0.5256)["tokens_per_second_per_chip"] == (
      pytest.approx(2909, rel=2e-3))
  assert describe.throughput_at(flops, v6e, 256, 0.3523)["tokens_per_second_per_chip"] == (
      pytest.approx(3899, rel=2e-3))
  causal = describe.decoder_only_flops_per_token(seq_len=4096, causal_attention=True,
                                                 **describe.MIXTRAL_8X7B)
  assert flops - causal == pytest.approx(3 * 32 * 2 * 4096 * 32 * 128)


def test_cli_plan_json_keeps_keys(capsys):
  assert describe.main(["--gin_file", TINY_MOE[0], "--batch", "4", "--lengths", "32,4",
                        "--accelerator", "v5e", "--chips", "8", "--mfu", "0.5", "--plan",
                        "--json"]) == 0
  figures = json.loads(capsys.readouterr().out)
  for key in ("total_params", "activated_params", "flops_per_token",
              "forward_flops_per_sequence", "memory", "estimate", "plan"):
    assert key in figures
  estimate = figures["estimate"]
  for key in ("mesh", "memory", "step_time_s", "tokens_per_step", "tokens_per_day",
              "all_to_all_bytes_per_chip", "model_flops_per_step", "fits"):
    assert key in estimate
  assert figures["memory"] == estimate["memory"]
  assert estimate["chips"] == 8 and estimate["mfu"] == 0.5


def test_cli_mesh_estimate_text(capsys):
  assert describe.main(["--gin_file", TINY_MOE[0], "--batch", "4", "--lengths", "32,4",
                        "--accelerator", "h100", "--mesh", "data=1,expert=2,model=1",
                        "--remat", "none"]) == 0
  out = capsys.readouterr().out
  assert "estimate: 2 x NVIDIA H100" in out
  assert "mesh:                 data=1,expert=2,model=1 (remat none" in out
  assert "all-to-all per chip:  0.000 GB" in out  # 24576 bytes, hand-checked above.
  assert re.search(r"step time: .* / \(2 chips x 989T x 0.4\)", out)


@pytest.mark.parametrize("extra, message", [
    (["--plan", "--chips", "8"], "--plan needs --accelerator"),
    (["--accelerator", "v4", "--chips", "8"], "need --batch and --lengths"),
    (["--accelerator", "v4", "--batch", "4", "--lengths", "32,4"],
     "--accelerator needs --mesh"),
    (["--accelerator", "v4", "--batch", "4", "--lengths", "32,4", "--plan"],
     "--plan needs --chips"),
    (["--accelerator", "v4", "--batch", "4", "--lengths", "32,4", "--plan", "--chips", "8",
      "--mesh", "data=8"], "either --plan"),
    (["--accelerator", "v4", "--batch", "4", "--lengths", "32,4", "--chips", "4",
      "--mesh", "data=8"], "has 8 devices but --chips is 4"),
    (["--chips", "8"], "--chips and --remat go with --accelerator"),
    (["--accelerator", "v5e", "--batch", "8", "--lengths", "32,4", "--plan", "--chips", "8",
      "--memory_fraction", "0.000001"], "Nothing fits"),
])
def test_cli_errors(extra, message, capsys):
  assert describe.main(["--gin_file", TINY_MOE[0]] + extra) == 2
  error = capsys.readouterr().err
  assert message in error, error
  assert len(error.strip().splitlines()) <= 2
