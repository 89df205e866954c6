"""dpo/train/speed/refcache.py on the tiny offline Phi model (4-bit base + LoRA, CPU): the cached reference
log-probs equal TRL's own precomputed ones, a second run hits, a changed setting misses, a
tampered cache stops the run at the parity check, resume reuses the cache, and under a
simulated 2-process split each process computes only its share."""

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import recipe_trainer as plain_recipe_trainer

from dpo.compat import DPOConfig
from dpo.errors import UserError
from dpo.files import file_sha256
from dpo.train.config import RecipeDPOConfig
from dpo.train.speed.refcache import COLUMNS, Store, _fill, check_reference_cache, row_ids
from dpo.train.speed.refstore import CHECKSUM


def recipe_trainer(*args, **overrides):
    """helpers.recipe_trainer planned for a whole epoch (6 steps of 2 of the 12 pairs) unless told otherwise: the
    cache fills every pair up front. A shorter plan fills its training pairs as it reaches them (test_reflazy.py)."""
    return plain_recipe_trainer(*args, **{"max_steps": 6, **overrides})


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

    (key_file,) = cache.glob("*/key.json")
    os.utime(key_file, (0, 0))  # last used in 1970
    before = int(time.time()) - 1  # whole seconds: a file system's timestamps may be that coarse
    second = recipe_trainer(tiny_model_dir, tmp_path / "b", cache, ld_alpha=ld_alpha)
    assert "reference cache: hit, 16 pairs read" in logged(capsys)
    # the hit is a use: python -m dpo.cache remove --unused_days 1 keeps it (was: removed, key.json written once).
    # Set during the run, not "within 10 minutes of now": a bound on how long the run took
    assert key_file.stat().st_mtime >= before
    assert second.train_dataset[COLUMNS[0]] == first.train_dataset[COLUMNS[0]]
    # a setting the values depend on is part of the key: a new folder, computed afresh
    recipe_trainer(tiny_model_dir, tmp_path / "c", cache, ld_alpha=ld_alpha, max_length=24)
    assert "reference cache: miss" in logged(capsys)
    assert len(list(cache.iterdir())) == 2


def test_training_with_the_cache_gives_the_inline_reference_loss(tiny_model_dir, tmp_path):
    """Same pairs, same order: per-step losses with cached and with inline reference log-probs agree. 4 steps
    reach 8 of the 12 pairs: the cache fills them as training reaches them (dpo/train/speed/reflazy.py)."""
    inline = recipe_trainer(tiny_model_dir, tmp_path / "inline", max_steps=4)
    cached = recipe_trainer(tiny_model_dir, tmp_path / "cached", tmp_path / "cache", max_steps=4)
    losses = []
    for trainer in (inline, cached):
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0] - 1e-3  # it trained, so equal losses are not trivially 0.693


def rewrite_parts(parts, change, sign=True):
    """Apply `change(values)` to the cached ref_chosen_logps of each part; `sign`: record the new file's
    sha256 as the writer does (values a changed kernel computed), else leave the old one (an edited file)."""
    for part in parts:
        table = pq.read_table(part)
        at = table.schema.get_field_index(COLUMNS[0])
        values = pa.array(change(table[COLUMNS[0]].to_numpy().copy()), pa.float32())
        pq.write_table(
            table.set_column(at, table.field(at), values).replace_schema_metadata(table.schema.metadata), part
        )
        if sign:
            part.with_name(part.name + CHECKSUM).write_text(file_sha256(part))


def test_tampered_cache_stops_the_run_at_the_parity_check(tiny_model_dir, tmp_path, capsys):
    """Values computed elsewhere (a changed kernel shifts every one by 1%), written as the cache writes them."""
    cache = tmp_path / "cache"
    recipe_trainer(tiny_model_dir, tmp_path / "a", cache)
    (folder,) = cache.iterdir()
    rewrite_parts(folder.glob("part-*.parquet"), lambda values: values * 1.01)
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
    shares = [set(pq.read_table(p)["row"].to_pylist()) for p in sorted(store.folder.glob("part-*.parquet"))]
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
    assert trainer.state.global_step == 6


# ── the cache's files: verified on load, written only whole, read-only when warm (dpo/train/speed/refstore.py) ──
def one_line(err) -> str:
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def moved_by_50_nats(values):
    values[3] -= 50.0  # one pair of 16: the parity check (8 random pairs an epoch) would likely miss it
    return values


@pytest.mark.parametrize(
    "damage, message",
    [
        ("one_value_edited", "is not the file that was written"),
        ("cut_short", "is not the file that was written"),
        ("checksum_missing", "has no readable checksum"),
        ("checksum_emptied", "has no usable checksum (part-"),  # was "has sha256 1a2b3c..., ... was recorded"
        ("nan_written_as_the_writer_would", "holds a non-finite reference log-prob (nan"),
    ],
)
def test_a_damaged_cache_part_is_refused_in_one_line_naming_it(tiny_model_dir, tmp_path, damage, message):
    cache = tmp_path / "cache"
    recipe_trainer(tiny_model_dir, tmp_path / "a", cache)
    (folder,) = cache.iterdir()
    part = sorted(folder.glob("part-*.parquet"))[0]  # one of the two parts (training pairs, held-out pairs)
    if damage == "one_value_edited":
        rewrite_parts([part], moved_by_50_nats, sign=False)
    elif damage == "cut_short":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "checksum_missing":
        part.with_name(part.name + CHECKSUM).unlink()
    elif damage == "checksum_emptied":
        part.with_name(part.name + CHECKSUM).write_text("")
    else:
        rewrite_parts([part], lambda values: values * float("nan"))
    with pytest.raises(UserError) as err:
        recipe_trainer(tiny_model_dir, tmp_path / "b", cache)
    line = one_line(err)
    assert f"reference cache part {part} {message}" in line and "delete it" in line, line


def test_the_store_never_writes_a_non_finite_value_or_rows_it_did_not_compute(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(UserError, match="non-finite log-prob"):
        store.write(["a", "b"], [-1.0, float("inf")], [-2.0, -3.0], [0.1, 0.1], {}, expected=2)
    with pytest.raises(RuntimeError, match="nothing stored"):
        store.write(["a", "b"], [-1.0], [-2.0], [0.1], {}, expected=2)
    with pytest.raises(UserError, match="non-finite log-prob"):  # a row never computed (None) is not stored
        store.write(["a"], [None], [-2.0], [0.1], {}, expected=1)
    assert list(tmp_path.iterdir()) == []
    store.write(["a"], [-1.0], [-2.0], [0.1], {}, expected=1)
    assert store.load().rows["a"][:2] == (-1.0, -2.0)


@contextlib.contextmanager
def unwritable(folder):
    """`folder` (and what is in it) cannot be written: write bits cleared; root ignores them, so for root the
    block runs as user nobody (the folder must then be readable by others: made under /tmp, mode 755)."""
    paths = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod((modes[p] | 0o555) & ~0o222)
    try:
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                yield
            finally:
                os.seteuid(0)
        else:
            yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture
def shared_tmp():
    folder = Path(tempfile.mkdtemp(prefix="dpo-refcache-ro-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_full_cache_is_read_only_and_a_cold_one_that_cannot_be_written_is_one_line(
    tiny_model_dir, tmp_path, shared_tmp, capsys
):
    from dpo.train.speed.refcache import attach_reference_cache

    trainer = recipe_trainer(tiny_model_dir, tmp_path / "run")  # no cache: attached below
    cold = shared_tmp / "cold"
    cold.mkdir()
    with unwritable(cold), pytest.raises(UserError) as err:
        attach_reference_cache(trainer, cold)
    line = one_line(err)
    assert f"reference cache {cold}/" in line and "lacks 16 of 16 pairs and cannot be written" in line, line
    assert list(cold.iterdir()) == []

    warm = shared_tmp / "warm"
    recipe_trainer(tiny_model_dir, tmp_path / "fill", warm)  # fills it
    before = sorted(p.relative_to(warm) for p in warm.rglob("*"))
    logged(capsys)
    with unwritable(warm):
        cache = attach_reference_cache(trainer, warm)
    assert "reference cache: hit, 16 pairs read" in logged(capsys) and cache.misses == 0
    assert sorted(p.relative_to(warm) for p in warm.rglob("*")) == before  # nothing written


def test_a_cache_dir_that_is_a_file_is_one_line(tiny_model_dir, tmp_path):
    taken = tmp_path / "cache"
    taken.write_text("not a folder")
    for cache_dir in (taken, taken / "below"):
        with pytest.raises(UserError) as err:
            recipe_trainer(tiny_model_dir, tmp_path / "run", cache_dir)
        assert f"reference_cache_dir {cache_dir}: {taken} is a file, not a folder" in one_line(err)


def test_the_cache_folder_is_named_and_a_folder_it_did_not_make_is_left_alone(tiny_model_dir, tmp_path, capsys):
    """Was: the log named no folder (with DPO_REFERENCE_CACHE='' it was the current one), and a folder at the
    key's place was read and written whatever it held."""
    cache = tmp_path / "cache"
    recipe_trainer(tiny_model_dir, tmp_path / "a", cache)
    (folder,) = cache.iterdir()
    assert f"reference cache: {folder}\n" in logged(capsys) and folder.is_absolute()
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "precious.txt").write_text("the user's")  # a folder the cache did not make, at its key's place
    with pytest.raises(UserError) as err:
        recipe_trainer(tiny_model_dir, tmp_path / "b", cache)
    assert f"reference cache folder {folder} exists but is not one the reference cache made" in one_line(err)
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]
