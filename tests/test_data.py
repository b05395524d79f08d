"""The data package on real files in temporary folders, with a tiny VLM built from config as the encoder."""

import filecmp
import io
import json
import math
import multiprocessing as mp
import shutil
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from durian_lightning.core.difficulty import pixel_entropy
from durian_lightning.data import EntropyCache, MultimodalReasoningDataModule, PixelEntropyScorer, build_messages
from durian_lightning.synthetic.dataset import generate

REPO = Path(__file__).resolve().parents[1]


def png(path: Path, size=(32, 32), seed=0, mode="RGB") -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path.name


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_folder(tmp_path: Path, n=6) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"images": [png(tmp_path / f"{i}.png", seed=i)], "problem": f"<image>q{i}", "answer": str(i)} for i in range(n)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "val.jsonl", rows[:2])
    return tmp_path


def datamodule(source, cache, **kwargs) -> MultimodalReasoningDataModule:
    kwargs.setdefault("entropy_method", "pixel")
    return MultimodalReasoningDataModule(source, cache_dir=str(cache), progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ sources


def test_folder_of_jsonl_files_with_pixel_entropy(tmp_path):
    source = small_folder(tmp_path / "d")
    dm = datamodule(source, tmp_path / "cache")
    dm.setup()
    assert sorted(dm.samples) == ["train", "validation"]
    sample = dm.samples["train"][3]
    expected = pixel_entropy(Image.open(source / "3.png").convert("RGB"))
    assert sample.visual_entropy == pytest.approx(expected)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"id", "images", "problem", "answer", "visual_entropy", "messages", "prompt"}
    assert batch["visual_entropy"].dtype == torch.float32 and len(batch["answer"]) == 6


def test_a_rows_own_id_column_is_its_sample_id_everywhere(tmp_path):
    rows = [{"id": f"q-{i}", "images": [png(tmp_path / f"{i}.png", seed=i)], "problem": "p", "answer": "1"} for i in range(2)]
    rows.append({"images": [png(tmp_path / "2.png", seed=2)], "problem": "p", "answer": "1"})  # no id: its 1-based row number
    write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tmp_path, tmp_path / "c")
    dm.setup()
    assert [s.id for s in dm.samples["train"]] == ["q-0", "q-1", "train-3"]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["id"]) == ["q-0", "q-1", "train-3"]  # the batch carries the same ids as the samples


def test_a_row_without_an_optional_column_gets_none_in_every_batch(tmp_path):
    rows = [{"images": [png(tmp_path / f"{i}.png", seed=i)], "problem": "p", "answer": "1", "clutter": i} for i in range(6)]
    del rows[3]["clutter"]
    rows[4]["clutter"] = None
    write_jsonl(tmp_path / "train.jsonl", rows)
    for seed in range(4):  # whichever rows share a batch with it
        dm = datamodule(tmp_path, tmp_path / "c", batch_size=3, shuffle_seed=seed)
        dm.setup()
        seen = {}
        for batch in dm.train_dataloader():
            seen.update(zip(batch["id"], batch["clutter"]))
        assert seen == {f"train-{i + 1}": (None if i in (3, 4) else i) for i in range(6)}  # ids: 1-based rows


def test_an_empty_split_after_skipping_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"images": ["missing.png"], "problem": "p", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no usable rows left in split\(s\) \['train'\].*skipped 1 bad row"):
        datamodule(tmp_path, tmp_path / "c", bad_rows="skip").setup()


@pytest.mark.parametrize("name", ["batch_size", "eval_batch_size", "entropy_batch_size"])
def test_batch_sizes_are_checked_when_the_datamodule_is_built(tmp_path, name):
    with pytest.raises(ValueError, match=f"data.{name} must be >= 1, got 0"):
        datamodule(tmp_path, tmp_path / "c", **{name: 0})


def test_json_parquet_and_bytes_sources_with_column_mapping(tmp_path):
    img = tmp_path / "a.png"
    png(img, seed=3)
    rows = [{"pic": "a.png", "question": "how many?", "label": "2", "pid": "x1"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    columns = {"images": "pic", "problem": "question", "answer": "label", "id": "pid"}
    from_json = datamodule(str(tmp_path / "rows.json"), tmp_path / "c", columns=columns)
    from_json.setup()
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"pic": [img.read_bytes()], "question": ["how many?"], "label": ["2"], "pid": ["x1"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    from_parquet = datamodule(str(tmp_path / "rows.parquet"), tmp_path / "c", columns=columns)
    from_parquet.setup()
    a, b = from_json.samples["train"][0], from_parquet.samples["train"][0]
    assert a.id == b.id == "x1" and a.answer == b.answer == "2"
    assert a.image_hashes == b.image_hashes  # same bytes from a path or inline
    assert a.visual_entropy == b.visual_entropy


def test_save_to_disk_folder_with_pil_images(tmp_path):
    import datasets

    images = [[Image.open(io.BytesIO((tmp_path / png(tmp_path / f"{i}.png", seed=i)).read_bytes()))] for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"images": images, "problem": ["p"] * 4, "answer": ["1", "2", "3", "4"]},
        features=datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"), "answer": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    dm = datamodule(str(tmp_path / "saved"), tmp_path / "c")
    dm.setup()
    assert len(dm.samples["train"]) == 4 and len(dm.samples["test"]) == 1
    assert dm.samples["test"][0].visual_entropy == dm.samples["train"][0].visual_entropy


def test_multi_image_rows_and_placeholders(tmp_path):
    rows = [{"images": [png(tmp_path / "a.png", seed=1), png(tmp_path / "b.png", seed=2)], "problem": "Compare <image> with <image>.", "answer": "A"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tmp_path, tmp_path / "c", system_prompt="sys", instruction="box it")
    dm.setup()
    s = dm.samples["train"][0]
    values = [pixel_entropy(Image.open(tmp_path / n).convert("RGB")) for n in ("a.png", "b.png")]
    assert s.visual_entropy == pytest.approx(sum(values) / 2)
    item = dm.dataset("train")[0]
    assert len(item["images"]) == 2
    kinds = [c["type"] for c in item["messages"][1]["content"]]
    assert kinds == ["text", "image", "text", "image", "text", "text"]
    assert item["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}


def test_build_messages_without_placeholders_puts_images_first():
    messages = build_messages("What is shown?", 2, None, None)
    assert [c["type"] for c in messages[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        build_messages("<image> only one", 2, None, None)


def test_splits_carved_from_train_with_a_seed(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"images": [png(tmp_path / f"{i}.png", seed=i)], "problem": "p", "answer": str(i)} for i in range(20)])
    first = datamodule(str(tmp_path / "train.jsonl"), tmp_path / "c", val_fraction=0.2, test_fraction=0.1, split_seed=7)
    first.setup()
    again = datamodule(str(tmp_path / "train.jsonl"), tmp_path / "c", val_fraction=0.2, test_fraction=0.1, split_seed=7)
    again.setup()
    sizes = {k: len(v) for k, v in first.samples.items()}
    assert sizes == {"train": 14, "validation": 4, "test": 2}
    ids = {k: sorted(s.id for s in v) for k, v in first.samples.items()}
    assert ids == {k: sorted(s.id for s in v) for k, v in again.samples.items()}
    assert not set(ids["train"]) & set(ids["validation"]) and not set(ids["validation"]) & set(ids["test"])


# ------------------------------------------------------------------------------------------------ cache


def test_spectral_cache_hit_invalidation_and_encoder_change(tmp_path, tiny_vlm_path):
    source = small_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    spectral = dict(entropy_method="spectral", model_name_or_path=tiny_vlm_path)
    cold = datamodule(source, cache, entropy_batch_size=4, **spectral)
    cold.setup()
    assert (cold.images_scored, cold.encoder_calls, cold.scorer_loads) == (6, 2, 1)  # 6 distinct images; val repeats two
    warm = datamodule(source, cache, **spectral)
    warm.setup()
    assert warm.scorer_loads == 0  # a complete cache needs no model
    assert [s.visual_entropy for s in warm.samples["train"]] == [s.visual_entropy for s in cold.samples["train"]]
    # the values are the spectral entropy of the encoder's patch features
    features, _ = cold.build_scorer().features([Image.open(source / "0.png").convert("RGB")])
    from durian_lightning.core.difficulty import spectral_entropy

    assert warm.samples["train"][0].visual_entropy == pytest.approx(spectral_entropy(features[0]).item())

    png(source / "2.png", seed=99)  # new bytes for one image
    changed = datamodule(source, cache, **spectral)
    changed.setup()
    assert changed.images_scored == 1
    assert changed.samples["train"][2].visual_entropy != cold.samples["train"][2].visual_entropy

    # everything else that changes what the encoder sees, or how it computes, recomputes every image
    for setting in ({"vision_layer": 1}, {"max_image_side": 40}, {"dtype": "bfloat16"},
                    {"image_processor_kwargs": {"do_normalize": False}}):
        other = datamodule(source, cache, **spectral, **setting)
        other.setup()
        assert other.images_scored == 6, setting
    pixel = [datamodule(source, cache, max_image_side=side) for side in (2048, 40)]
    for dm in pixel:
        dm.setup()
    assert [dm.images_scored for dm in pixel] == [6, 6]


def test_changed_weight_files_recompute_even_in_the_same_folder(tmp_path, tiny_vlm_path):
    from durian_lightning.models import tiny_llava_path

    source = small_folder(tmp_path / "d")
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm_path, model)
    first = datamodule(source, tmp_path / "cache", entropy_method="spectral", model_name_or_path=str(model))
    first.setup()
    assert first.images_scored == 6 and (tmp_path / "cache" / "model-file-hashes.json").is_file()
    other_weights = tiny_llava_path(tmp_path / "other-model", seed=1)
    shutil.copy(other_weights / "model.safetensors", model / "model.safetensors")  # a fine-tuned encoder, same place
    second = datamodule(source, tmp_path / "cache", entropy_method="spectral", model_name_or_path=str(model))
    second.setup()
    assert second.images_scored == 6
    assert [s.visual_entropy for s in second.samples["train"]] != [s.visual_entropy for s in first.samples["train"]]


def test_the_scorer_loads_the_image_path_in_the_runs_dtype_and_is_freed_after_the_precompute(
        tmp_path, tiny_vlm_path, monkeypatch):
    from durian_lightning.data import datamodule as datamodule_module

    loaded = []
    real = datamodule_module.load_image_encoder

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append((weakref.ref(model), {p.dtype for p in model.parameters()}, [n for n, _ in model.named_parameters()]))
        return model

    monkeypatch.setattr(datamodule_module, "load_image_encoder", recording)
    source = small_folder(tmp_path / "d")
    dm = datamodule(source, tmp_path / "cache", entropy_method="spectral", model_name_or_path=tiny_vlm_path,
                    dtype="bfloat16")
    dm.setup()
    (model, dtypes, names), = loaded
    assert model() is None  # nothing keeps the encoder once the entropies are cached
    assert dtypes == {torch.bfloat16}
    assert names and not [n for n in names if "language_model" in n or "lm_head" in n]

    def no_model(*args, **kwargs):
        raise AssertionError("a complete cache loaded a model")

    monkeypatch.setattr(datamodule_module, "load_image_encoder", no_model)
    warm = datamodule(source, tmp_path / "cache", entropy_method="spectral", model_name_or_path=tiny_vlm_path,
                      dtype="bfloat16")
    warm.setup()
    assert [s.visual_entropy for s in warm.samples["train"]] == [s.visual_entropy for s in dm.samples["train"]]


class Interrupt(Exception):
    pass


def test_an_interrupted_precompute_resumes_where_it_stopped(tmp_path, monkeypatch):
    source = small_folder(tmp_path / "d", n=10)
    dm = datamodule(source, tmp_path / "cache", entropy_batch_size=3)
    original = PixelEntropyScorer.__call__

    def dies_on_third_batch(self, images):
        if dm.encoder_calls == 2:
            raise Interrupt
        return original(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(PixelEntropyScorer, "__call__", dies_on_third_batch)
        with pytest.raises(Interrupt):
            dm.setup()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # no half-written file left
    resumed = datamodule(source, tmp_path / "cache", entropy_batch_size=3)
    resumed.setup()
    assert resumed.images_scored == 10 - 6  # two batches of 3 were kept
    fresh = datamodule(source, tmp_path / "fresh", entropy_batch_size=3)
    fresh.setup()
    assert [s.visual_entropy for s in resumed.samples["train"]] == [s.visual_entropy for s in fresh.samples["train"]]


def test_unreadable_cache_parts_are_ignored_and_recomputed(tmp_path, caplog):
    cache = EntropyCache(tmp_path, "f" * 64)
    cache.add({"a": 1.5})
    (cache.dir / "part-broken.json").write_text('{"version": 1, "finger')  # e.g. a disk error
    (cache.dir / ".tmp-123.json").write_text("partial")  # a writer killed before its rename
    assert cache.load() == {"a": 1.5}
    assert "ignoring unreadable entropy cache part" in caplog.text
    other = EntropyCache(tmp_path, "f" * 32 + "0" * 32)  # same folder prefix, other fingerprint
    assert other.load() == {}
    cache.add({"b": 2.0})
    cache.compact()
    assert cache.load() == {"a": 1.5, "b": 2.0}


def test_a_corrupted_or_edited_cache_part_costs_only_its_own_images(tmp_path, caplog, monkeypatch):
    from durian_lightning.data import entropy_cache

    monkeypatch.setattr(entropy_cache, "PART_SIZE", 2)
    cache = EntropyCache(tmp_path, "f" * 64)
    for i, key in enumerate("abcde"):
        cache.add({key: float(i)})
    cache.compact()  # 5 parts of one -> 3 parts of at most 2
    parts = sorted(cache.dir.glob("part-*.json"))
    assert len(parts) == 3 and cache.load() == {k: float(i) for i, k in enumerate("abcde")}
    edited = next(p for p in parts if '"a": 0.0' in p.read_text())
    edited.write_text(edited.read_text().replace('"a": 0.0', '"a": 7.0'))  # a hand edit, or a flipped digit
    assert cache.load() == {"c": 2.0, "d": 3.0, "e": 4.0}  # a and b (that part) are recomputed, nothing else
    assert "do not match its checksum" in caplog.text


def test_a_full_disk_while_merging_the_cache_loses_nothing(tmp_path, caplog, monkeypatch):
    import errno

    cache = EntropyCache(tmp_path, "f" * 64)
    cache.add({"a": 1.5})
    cache.add({"b": 2.5})
    before = sorted(cache.dir.glob("part-*.json"))

    def full_disk(name, entries):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_write", full_disk)
    cache.compact()  # a warning, not an error: every value is already on disk
    assert "could not merge" in caplog.text
    assert sorted(cache.dir.glob("part-*.json")) == before and cache.load() == {"a": 1.5, "b": 2.5}


def _rank_entropies(args):
    source, cache, model = args
    dm = MultimodalReasoningDataModule(source, model_name_or_path=model, cache_dir=cache, progress=False, entropy_batch_size=2)
    dm.setup()
    return [s.visual_entropy for s in dm.samples["train"]], dm.images_scored


def test_two_ranks_precomputing_at_once_get_identical_entropies_computed_once(tmp_path, tiny_vlm_path):
    source = str(small_folder(tmp_path / "d"))
    cache = str(tmp_path / "cache")
    probe = MultimodalReasoningDataModule(source, model_name_or_path=tiny_vlm_path, cache_dir=cache, progress=False)
    with mp.get_context("spawn").Pool(2) as pool:
        with EntropyCache(cache, probe.entropy_fingerprint()).lock():  # both start while a third process holds it
            pending = pool.map_async(_rank_entropies, [(source, cache, tiny_vlm_path)] * 2)
            time.sleep(2)
        (rank0, scored0), (rank1, scored1) = pending.get()
    assert rank0 == rank1 and all(math.isfinite(v) for v in rank0)
    assert scored0 + scored1 == 6  # the 6 distinct images, once: the second process found the first one's values
    after = MultimodalReasoningDataModule(source, model_name_or_path=tiny_vlm_path, cache_dir=cache, progress=False)
    after.setup()
    assert after.scorer_loads == 0
    assert [s.visual_entropy for s in after.samples["train"]] == rank0


def test_dataset_entropy_thresholds(tmp_path):
    dm = datamodule(small_folder(tmp_path / "d"), tmp_path / "c")
    dm.setup()
    values = np.array([s.visual_entropy for s in dm.samples["train"]])
    np.testing.assert_allclose(dm.entropy_thresholds().numpy(), np.percentile(values, [25, 75]))


# ------------------------------------------------------------------------------------------------ bad input


def bad_image_cases(folder: Path) -> dict[str, object]:
    good = folder / png(folder / "good.png", seed=5)
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    return {"corrupt": "corrupt.png", "truncated": "truncated.png", "missing": "nowhere.png"}


@pytest.mark.parametrize("case", ["corrupt", "truncated", "missing"])
def test_bad_images_raise_naming_file_row_and_field(tmp_path, case):
    cases = bad_image_cases(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"images": ["good.png"], "problem": "p", "answer": "1"}, {"images": [cases[case]], "problem": "p", "answer": "1"}])
    with pytest.raises(ValueError, match=r"train\.jsonl: row 2 \(id train-2\): field 'images'\[0\]"):
        datamodule(tmp_path, tmp_path / "c").setup()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"images": ["good.png"], "problem": "p", "answer": ""}, "field 'answer' is empty or missing"),
        ({"images": ["good.png"], "problem": "p"}, "field 'answer' is empty or missing"),
        ({"images": [], "problem": "p", "answer": "1"}, "field 'images' holds no image"),
        ({"images": ["good.png"], "problem": "", "answer": "1"}, "field 'problem' must be a non-empty string"),
    ],
)
def test_bad_rows_raise_naming_the_field(tmp_path, row, message):
    png(tmp_path / "good.png")
    write_jsonl(tmp_path / "train.jsonl", [{"images": ["good.png"], "problem": "p", "answer": "1"}, row])
    with pytest.raises(ValueError, match=f"row 2 .*{message}"):
        datamodule(tmp_path, tmp_path / "c").setup()


def test_skip_policy_counts_names_and_keeps_bad_rows_out_of_the_cache(tmp_path):
    cases = bad_image_cases(tmp_path)
    rows = [{"images": ["good.png"], "problem": "p", "answer": "1"}]
    rows += [{"images": [v], "problem": "p", "answer": "1"} for v in cases.values()]
    rows += [{"images": ["good.png"], "problem": "p", "answer": " "}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tmp_path, tmp_path / "c", bad_rows="skip")
    with pytest.warns(UserWarning, match="skipped 4 bad row"):
        dm.setup()
    assert [s.id for s in dm.samples["train"]] == ["train-1"]
    assert len(dm.skipped_rows) == 4 and "row 4" in dm.skipped_rows[2]
    cached = EntropyCache(tmp_path / "c", dm.entropy_fingerprint()).load()
    assert list(cached) == dm.samples["train"][0].image_hashes


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"column 'images' \(for 'images'\) not found; the columns are \['image', 'question', 'answer'\]"):
        datamodule(tmp_path, tmp_path / "c").setup()


def test_malformed_and_undecodable_lines_are_bad_rows_named_by_file_and_line(tmp_path):
    good = json.dumps({"images": [png(tmp_path / "0.png")], "problem": "p", "answer": "1"}).encode()
    (tmp_path / "train.jsonl").write_bytes(good + b"\n{not json\n" + good[:-2] + b'\xff"}\n' + b"[1, 2]\n" + good + b"\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: row 2 \(id train-2\): line 2 is not valid JSON"):
        datamodule(tmp_path, tmp_path / "c").setup()
    dm = datamodule(tmp_path, tmp_path / "c", bad_rows="skip")
    with pytest.warns(UserWarning, match="skipped 3 bad row"):
        dm.setup()
    assert [s.id for s in dm.samples["train"]] == ["train-1", "train-5"]  # the good rows keep their line numbers
    assert "line 3 is not UTF-8" in dm.skipped_rows[1] and "line 4 holds a JSON list" in dm.skipped_rows[2]


def test_a_json_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "train.json").write_bytes(b'[{"problem": "\xff"}]')
    with pytest.raises(ValueError, match=r"train\.json: not UTF-8 \(byte \d+\)"):
        datamodule(tmp_path, tmp_path / "c").setup()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK", "1", "I", "F"])
def test_every_image_mode_is_read(tmp_path, mode, tiny_vlm_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode in ("I", "F"):
        image = Image.fromarray(rgb[..., 0].astype(np.int32 if mode == "I" else np.float32))
    else:
        image = Image.fromarray(rgb).convert(mode)
    assert image.mode == mode
    image.save(tmp_path / "x.tiff")  # TIFF keeps every one of these modes
    write_jsonl(tmp_path / "train.jsonl", [{"images": ["x.tiff"], "problem": "p", "answer": "1"}])
    dm = datamodule(tmp_path, tmp_path / "c", entropy_method="spectral", model_name_or_path=tiny_vlm_path)
    dm.setup()
    assert math.isfinite(dm.samples["train"][0].visual_entropy)
    assert dm.dataset("train")[0]["images"][0].mode == "RGB"


def test_tiny_and_huge_images(tmp_path, tiny_vlm_path):
    Image.new("RGB", (1, 1), "red").save(tmp_path / "one.png")
    Image.new("L", (10000, 10000), 128).save(tmp_path / "huge.png")
    rows = [{"images": ["one.png"], "problem": "p", "answer": "1"}, {"images": ["huge.png"], "problem": "p", "answer": "2"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tmp_path, tmp_path / "c", entropy_method="spectral", model_name_or_path=tiny_vlm_path, max_image_side=512)
    dm.setup()
    assert all(math.isfinite(s.visual_entropy) for s in dm.samples["train"])
    assert max(dm.dataset("train")[1]["images"][0].size) == 512


def test_an_image_over_pillows_decompression_bomb_limit_is_a_named_bad_row(tmp_path, monkeypatch):
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS (about 179M pixels, e.g. 15000 x 15000); the limit is lowered
    # here so that a small file stands for one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png(tmp_path / "big.png", size=(100, 100))
    write_jsonl(tmp_path / "train.jsonl", [{"id": "q1", "images": ["big.png"], "problem": "p", "answer": "1"}])
    with pytest.raises(ValueError) as raised:
        datamodule(tmp_path, tmp_path / "c").setup()
    message = str(raised.value)
    assert "train.jsonl" in message and "q1" in message and "too large to decode safely" in message
    assert "MAX_IMAGE_PIXELS" in message


def test_bad_configuration():
    with pytest.raises(ValueError, match="needs model_name_or_path"):
        MultimodalReasoningDataModule("data/synthetic", entropy_method="spectral")
    with pytest.raises(ValueError, match="bad_rows"):
        MultimodalReasoningDataModule("data/synthetic", entropy_method="pixel", bad_rows="ignore")
    with pytest.raises(ValueError, match="does not exist"):
        MultimodalReasoningDataModule("./no/such/dir", entropy_method="pixel").setup()


# ------------------------------------------------------------------------------------------------ bundled data


def test_shipped_synthetic_data_equals_the_generator(tmp_path):
    generate(tmp_path)
    shipped = REPO / "data" / "synthetic"
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (shipped / f"{split}.jsonl").read_text()
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == sorted(p.name for p in (shipped / "images").iterdir()) and len(names) == 600
    for name in names:
        if not filecmp.cmp(tmp_path / "images" / name, shipped / "images" / name, shallow=False):
            # PNG bytes may differ across zlib builds; the pixels may not
            assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / name)), np.asarray(Image.open(shipped / "images" / name))), name
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 10 * 2**20


def test_synthetic_generator_is_deterministic_and_varied(tmp_path):
    a, b = generate(tmp_path / "a", splits={"train": 40}, seed=3), generate(tmp_path / "b", splits={"train": 40}, seed=3)
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert {r["question_type"] for r in rows} == {"count", "total", "color", "sum"}
    assert {r["clutter"] for r in rows} == {0, 1, 2, 3}
    other = generate(tmp_path / "c", splits={"train": 40}, seed=4)
    assert (other / "train.jsonl").read_text() != (a / "train.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("feature_source, layer", [("vision_tower", -1), ("vision_tower", 0), ("vision_tower", 1), ("projector", -1)])
@pytest.mark.parametrize("model_fixture", ["tiny_vlm_path", "tiny_qwen_path"])
def test_spectral_scorer_batches_images_of_different_sizes_exactly(request, model_fixture, feature_source, layer):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from durian_lightning.core.difficulty import spectral_entropy
    from durian_lightning.data import SpectralEntropyScorer

    path = request.getfixturevalue(model_fixture)
    scorer = SpectralEntropyScorer(
        AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path), layer, feature_source
    )
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (112, 56), (40, 90)]  # Qwen-VL gives each its own patch grid
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    features, mask = scorer.features(images)
    if model_fixture == "tiny_qwen_path":
        assert len(set(mask.sum(1).tolist())) > 1  # really different patch counts, padded and masked
    batched = scorer(images)
    alone = [scorer([image])[0] for image in images]
    np.testing.assert_allclose(batched, alone, rtol=1e-5)
    first = features[0, : int(mask[0].sum())]
    assert batched[0] == pytest.approx(spectral_entropy(first.float()).item(), rel=1e-6)


def test_qwen_style_model_through_the_datamodule(tmp_path, tiny_qwen_path):
    dm = datamodule(small_folder(tmp_path / "d"), tmp_path / "c", entropy_method="spectral", model_name_or_path=tiny_qwen_path)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert "<|vision_start|><|image_pad|><|vision_end|>" in batch["prompt"][0]
    assert torch.isfinite(batch["visual_entropy"]).all()


def test_a_relative_data_path_outside_its_working_directory_says_where_it_looked(tmp_path, monkeypatch):
    from durian_lightning.data.sources import load_source

    monkeypatch.chdir(tmp_path)  # as `durian fit` run outside the repository: data/synthetic is not here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as raised:
        load_source("data/synthetic")
    message = str(raised.value)
    assert "'data/synthetic'" in message and str(tmp_path) in message and "repository root" in message


def test_model_file_hashes_read_a_hub_blobs_name_and_hash_other_files_once(tmp_path):
    import hashlib

    from durian_lightning.data.model_files import model_file_hashes

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / ("ab" * 32)).write_bytes(b"weights")  # the hub names an LFS blob by its SHA-256
    (snapshot / "model.safetensors").symlink_to(blobs / ("ab" * 32))
    (snapshot / "config.json").write_text('{"model_type": "llava"}')
    memo = tmp_path / "memo.json"
    hashes = model_file_hashes(str(snapshot), memo)
    assert hashes == {"model.safetensors": "ab" * 32,
                      "config.json": hashlib.sha256(b'{"model_type": "llava"}').hexdigest()}
    assert list(json.loads(memo.read_text())) == [str((snapshot / "config.json").resolve())]
    (snapshot / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert model_file_hashes(str(snapshot), memo)["config.json"] == hashlib.sha256(b'{"model_type": "qwen2_5_vl"}').hexdigest()
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_file_hashes(str(snapshot), memo)
