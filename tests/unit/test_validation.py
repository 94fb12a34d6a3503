"""Held-out rows and the validator: deterministic, bounded, bad input counted, invisible to training."""

from __future__ import annotations

import json

import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.loader import sample_spec
from data_pipelines.training.validation import build_validation_set, pack_in_order
from tests.batches import assert_same_batches
from tests.shard_writer import write_shard
from train.config.compose import load_config
from train.loop.train_module import TrainModule
from train.evaluate.heldout import Validator
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo
from train.precision import build_precision


def smoke_config(synth_data, *overrides):
    return load_config("stage1_image_sft", ["smoke=cpu", f"data.synth_dir={synth_data.root}", *overrides])


def test_validation_rows_are_the_first_samples_in_order_every_time(synth_data, tokenizer):
    cfg = smoke_config(synth_data)
    spec = sample_spec(cfg.data, cfg.model.tokens_per_tile, cfg.seed)
    source = SourceConfig(name="held", path=str(synth_data.heldout_dirs["image"]))
    first = build_validation_set(source, spec, tokenizer, max_samples=5)
    again = build_validation_set(source, spec, tokenizer, max_samples=5)
    assert len(first.keys) == 5 and first.keys == again.keys
    assert all(key.startswith("synth_image-1000003-") for key in first.keys)  # the held-out seed, not training's
    assert_same_batches(first.batches, again.batches)
    assert all(b.input_ids.shape == (1, spec.seq_length) for b in first.batches)
    assert sum(b.num_samples for b in first.batches) == 5
    everything = build_validation_set(source, spec, tokenizer, max_samples=1000)
    assert everything.keys[:5] == first.keys and len(everything.keys) == 8  # all the held-out images, no more


def test_pack_in_order_keeps_order_and_fills_rows(synth_data, tokenizer):
    cfg = smoke_config(synth_data)
    spec = sample_spec(cfg.data, cfg.model.tokens_per_tile, cfg.seed)
    source = SourceConfig(name="held", path=str(synth_data.heldout_dirs["text"]))
    validation = build_validation_set(source, spec, tokenizer, max_samples=16)
    from data_pipelines.training.samples import build_sample
    from data_pipelines.training.shards import expand_shard_paths, iter_shard

    samples = [build_sample(raw, "held", spec, tokenizer) for shard in expand_shard_paths(source.path)
               for raw in iter_shard(shard)]
    rows = pack_in_order(samples, spec.seq_length)
    assert [s.key for row in rows for s in row] == [s.key for s in samples] == validation.keys
    assert all(sum(len(s.input_ids) for s in row) <= spec.seq_length for row in rows)
    # A row closes only when the next sample does not fit.
    assert all(sum(len(s.input_ids) for s in row) + len(nxt[0].input_ids) > spec.seq_length
               for row, nxt in zip(rows, rows[1:]))


def test_bad_held_out_samples_are_counted_skips(synth_data, tokenizer, tmp_path):
    cfg = smoke_config(synth_data)
    spec = sample_spec(cfg.data, cfg.model.tokens_per_tile, cfg.seed)
    good = {"json": json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": "Hi."}]}).encode()}
    write_shard(tmp_path / "shard-000000.tar", [("ok1", good), ("broken", {"json": b'{"messages": ['}), ("ok2", good)])
    validation = build_validation_set(SourceConfig(name="mixed", path=str(tmp_path)), spec, tokenizer, max_samples=8)
    assert validation.keys == ["ok1", "ok2"]
    assert dict(validation.skipped) == {"malformed_json": 1}


def test_validator_is_the_per_token_mean_and_leaves_fp8_state_untouched(synth_data, tokenizer):
    cfg = smoke_config(synth_data, "precision=fp8_delayed_emulated", "trainer.eval_samples=4")
    assert [s.name for s in cfg.data.val_sources] == ["synth_image", "synth_multi_image", "synth_text"]
    assert [s.name for s in cfg.data.monitor_sources] == ["monitor_code_reasoning"]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    precision = build_precision(cfg.precision, info.device)
    model = VisionLanguageModel(cfg.model, image_token_id=tokenizer.special_ids[st.IMG_CONTEXT],
                                image_end_id=tokenizer.special_ids[st.IMG_END])
    model.reset_parameters(cfg.seed)
    model = precision.convert_model(model)
    with precision.autocast():  # a training forward first, so the FP8 state holds real amaxes
        model(build_validation_set(cfg.data.val_sources[0], sample_spec(cfg.data, cfg.model.tokens_per_tile, 0),
                                   tokenizer, 2).batches[0])
    before = {k: v.clone() for k, v in precision.state_dict().items()}
    assert before and any(v.abs().sum() > 0 for k, v in before.items() if "amax_history" in k)

    validator = Validator(cfg, tokenizer, info, precision)
    loss_sum = TrainModule(model, None, cfg, info, precision).loss_sum  # the trainer's forward-only loss
    result = validator.evaluate(loss_sum)
    after = precision.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert validator.evaluate(loss_sum) == result  # and evaluating again sees the same state

    # By hand: loss sums over supervised tokens, per source, then over the val sources.
    expected, totals = {}, [0.0, 0.0]
    for k, validation in enumerate(validator.sets()):
        loss_sum = weight = 0.0
        for batch in validation.batches:
            with torch.no_grad(), precision.autocast():
                loss, _ = model(batch)
            loss_sum, weight = loss_sum + float(loss), weight + batch.loss_weight
            precision.load_state_dict(before)
        expected[f"val/{validation.name}/loss"] = loss_sum / weight
        if k < 3:
            totals = [totals[0] + loss_sum, totals[1] + weight]
    expected["val/loss"] = totals[0] / totals[1]
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(result[key] - value) <= 1e-12 * abs(value), key
    assert sum(len(v.keys) for v in validator.sets()) == 4 * 4  # trainer.eval_samples per source
