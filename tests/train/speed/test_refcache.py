"""dpo/train/speed/refcache.py on the tiny offline Phi model (4-bit base + LoRA, CPU): the cached reference
log-probs equal TRL's own precomputed ones, a second run hits, a changed setting misses, a
tampered cache stops the run at the parity check, resume reuses the cache, and under a
simulated 2-process split each process computes only its share."""

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import recipe_trainer

from dpo.compat import DPOConfig
from dpo.errors import UserError
from dpo.train.config import RecipeDPOConfig
from dpo.train.speed.refcache import COLUMNS, Store, _fill, check_reference_cache, row_ids


def logged(capsys) -> str:
    return capsys.readouterr().out


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_cache_equals_trls_precompute_then_hits(tiny_model_dir, tmp_path, capsys, ld_alpha):
    cache = tmp_path / "cache"
    first = recipe_trainer(tiny_model_dir, tmp_path / "a", cache, ld_alpha=ld_alpha)
    assert "reference cache: miss, computed 16 of 16 pairs" in logged(capsys)
    trl = recipe_trainer(
        tiny_model_dir, tmp_path / "trl", config=DPOConfig, precompute_ref_log_probs=True, ld_alpha=ld_alpha
    )
    for ours, theirs in ((first.train_dataset, trl.train_dataset), (first.eval_dataset, trl.eval_dataset)):
        for column in COLUMNS:
            torch.testing.assert_close(torch.tensor(ours[column]), torch.tensor(theirs[column]), rtol=1e-5, atol=1e-4)

    second = recipe_trainer(tiny_model_dir, tmp_path / "b", cache, ld_alpha=ld_alpha)
    assert "reference cache: hit, 16 pairs read" in logged(capsys)
    assert second.train_dataset[COLUMNS[0]] == first.train_dataset[COLUMNS[0]]
    # a setting the values depend on is part of the key: a new folder, computed afresh
    recipe_trainer(tiny_model_dir, tmp_path / "c", cache, ld_alpha=ld_alpha, max_length=24)
    assert "reference cache: miss" in logged(capsys)
    assert len(list(cache.iterdir())) == 2


def test_training_with_the_cache_gives_the_inline_reference_loss(tiny_model_dir, tmp_path):
    """Same pairs, same order: per-step losses with cached and with inline reference log-probs agree."""
    inline = recipe_trainer(tiny_model_dir, tmp_path / "inline")
    cached = recipe_trainer(tiny_model_dir, tmp_path / "cached", tmp_path / "cache")
    losses = []
    for trainer in (inline, cached):
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0] - 1e-3  # it trained, so equal losses are not trivially 0.693


def test_tampered_cache_stops_the_run_at_the_parity_check(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    recipe_trainer(tiny_model_dir, tmp_path / "a", cache)
    (folder,) = cache.iterdir()
    for part in folder.glob("part-*.parquet"):  # shift every cached value by 1%: a changed kernel would look so
        table = pq.read_table(part)
        at = table.schema.get_field_index(COLUMNS[0])
        shifted = table.set_column(at, table.field(at), pa.array(table[COLUMNS[0]].to_numpy() * 1.01, pa.float32()))
        pq.write_table(shifted.replace_schema_metadata(table.schema.metadata), part)
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "b", cache)
    assert "reference cache: hit" in logged(capsys)
    with pytest.raises(UserError, match="parity check failed: training pair .* cached in .*part-.*Likely cause"):
        trainer.train()
    assert trainer.state.global_step == 0  # stopped before the first step


def test_resume_mid_epoch_reuses_the_cache_and_the_grouped_order(tiny_model_dir, tmp_path, capsys):
    """12 pairs in batches of 2 = 6 steps an epoch; stopped after step 7 (inside epoch 2), resumed:
    steps 8-9 see the same batches and give the same losses as the uninterrupted run."""
    cache = tmp_path / "cache"
    settings = dict(max_steps=9, save_strategy="steps", save_steps=7, train_sampling_strategy="group_by_length")
    first = recipe_trainer(tiny_model_dir, tmp_path / "run", cache, **settings)
    first.train()
    logged(capsys)
    checkpoint = str(tmp_path / "run" / "checkpoint-7")  # named in the settings too: the output_dir holds this run
    resumed = recipe_trainer(tiny_model_dir, tmp_path / "run", cache, resume_from_checkpoint=checkpoint, **settings)
    assert "reference cache: hit" in logged(capsys)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert "reference cache parity: 8 pairs recomputed" in logged(capsys)  # also checked on resume
    for key in ("loss", "logps/chosen", "logps/rejected"):  # (num_tokens restarts on resume)
        want = [h[key] for h in first.state.log_history if h.get("step") in (8, 9) and key in h]
        got = [h[key] for h in resumed.state.log_history if h.get("step") in (8, 9) and key in h]
        assert len(got) == 2
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_each_process_computes_only_its_share(tiny_model_dir, tmp_path, monkeypatch):
    """Two processes of one launch, simulated one after the other from the same empty store: each
    computes every other missing pair into its own part file; together they hold every pair once."""
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "dp", config=DPOConfig)  # no cache
    real, store = trainer.accelerator, Store(tmp_path / "store")
    store.folder.mkdir()
    rows = row_ids(trainer.train_dataset)
    for rank in (0, 1):
        fake = SimpleNamespace(
            process_index=rank,
            num_processes=2,
            is_local_main_process=False,
            device=real.device,
            wait_for_everyone=lambda: None,
            unwrap_model=real.unwrap_model,
            autocast=real.autocast,
        )
        monkeypatch.setattr(trainer, "accelerator", fake)
        _, missing, _ = _fill(trainer, store, trainer.train_dataset, rows, "train", {})
        assert missing == 12
    monkeypatch.setattr(trainer, "accelerator", real)
    shares = [set(pq.read_table(p)["row"].to_pylist()) for p in sorted(store.folder.glob("part-*"))]
    assert [len(s) for s in shares] == [6, 6] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(rows)
    # and the values are the ones one process would compute alone
    alone = recipe_trainer(tiny_model_dir, tmp_path / "alone", tmp_path / "cache")
    loaded = store.load().rows
    assert [loaded[r][0] for r in rows] == pytest.approx(alone.train_dataset[COLUMNS[0]], rel=1e-5)


def test_refused_settings_are_named():
    base = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(UserError, match="sync_ref_model"):
        check_reference_cache(RecipeDPOConfig(**base, sync_ref_model=True))
    with pytest.raises(UserError, match="precompute_ref_log_probs: false"):
        check_reference_cache(RecipeDPOConfig(**base, precompute_ref_log_probs=True))
    check_reference_cache(RecipeDPOConfig(**base, loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=True))


def test_the_cold_pass_runs_under_inference_mode_and_training_follows(tiny_model_dir, tmp_path, monkeypatch):
    """The cache fill scores every batch under torch.inference_mode (no autograd records), packed when
    packing is on; nothing it makes reaches training, which then runs its steps."""
    import dpo.train.speed.refcache as refcache

    seen, real = [], refcache.precomputed_reference_logps

    def recording(trainer, batch):
        seen.append(torch.is_inference_mode_enabled())
        return real(trainer, batch)

    monkeypatch.setattr(refcache, "precomputed_reference_logps", recording)
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run", tmp_path / "cache", packing=True)
    assert len(seen) == 3 + 1 and all(seen)  # 12 training pairs in batches of 4 (the eval batch size), 4 held out
    trainer.train()
    assert trainer.state.global_step == 4
