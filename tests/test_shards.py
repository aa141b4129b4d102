"""Shard I/O: round trip, manifest, determinism, atomic replacement, bad input and the skip-up-to-a-fraction reader."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from unirl.data import shards
from unirl.data.shard_writer import write_shards
from unirl.data.shards import Record, ShardError, list_shards, read_samples
from unirl.data.validate import metadata_table

RES = 16


def _img(seed: int, size: tuple[int, int] = (RES, RES)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # (H, W, 3)


def _t2i(i: int, tag: str = "counting", count: int = 2, size: tuple[int, int] = (RES, RES)) -> Record:
    md = {
        "tag": tag,
        "include": [{"class": "circle", "count": count}, {"class": "square", "count": 1}],
        "prompt": f"a photo of {count} circles and a square #{i}",
    }
    meta = {"task": "t2i", "tag": tag, "prompt": md["prompt"], "resolution": RES, "metadata": md, "scene": {"i": i}}
    return Record("t2i", {"png": _img(i, size)}, meta)


def _triples(n: int, **kw) -> list[tuple[str, str, Record]]:
    splits = ("train", "train", "val", "test")
    return [(f"t2i_{i:04d}", splits[i % 4], _t2i(i, tag=("counting", "colors")[i % 2], **kw)) for i in range(n)]


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar written with tarfile directly, to plant malformed samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _png(img: Image.Image) -> bytes:
    return shards.encode_png(img)


def _good_members(key: str, i: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.json", json.dumps(_t2i(i).meta).encode()), (f"{key}.png", _png(_img(i)))]


def test_round_trip_pixels_and_meta(tmp_path: Path) -> None:
    triples = _triples(8)
    edit = Record("edit", {"src.png": _img(100), "tgt.png": _img(101)}, {"tag": "add", "prompt": "add a circle"})
    text = Record("understand", {}, {"task": "understand", "tag": "arithmetic", "prompt": "2+2?", "answer": "4"})
    write_shards(triples, tmp_path, "t2i")
    write_shards([("e_0", "train", edit)], tmp_path, "edit")
    write_shards([("u_0", "test", text)], tmp_path, "understand")

    got = {s.key: s for s in read_samples(tmp_path / "t2i", resolution=RES)}
    assert sorted(got) == sorted(k for k, _, _ in triples)
    for key, split, rec in triples:
        s = got[key]
        assert s.task == "t2i" and s.meta == rec.meta and Path(s.shard).name.startswith(split)
        assert np.array_equal(np.asarray(s.images["png"]), np.asarray(rec.images["png"]))
    (e,) = list(read_samples(tmp_path / "edit", resolution=RES))
    assert e.meta == {"task": "edit", "tag": "add", "prompt": "add a circle"}  # task filled in from the record
    for ext in ("src.png", "tgt.png"):
        assert np.array_equal(np.asarray(e.images[ext]), np.asarray(edit.images[ext]))
    (u,) = list(read_samples(tmp_path / "understand"))
    assert u.images == {} and u.meta == text.meta
    only_val = list(read_samples(tmp_path / "t2i", "val"))
    assert [s.key for s in only_val] == [k for k, sp, _ in triples if sp == "val"]
    val_shard = tmp_path / "t2i" / "val-000000.tar"
    assert [s.key for s in read_samples(val_shard, task="t2i")] == [s.key for s in only_val]
    # plain WebDataset reads the same shards
    wds_samples = list(wds.WebDataset(str(val_shard), shardshuffle=False).decode("pil"))
    assert [(w["__key__"], w["json"]) for w in wds_samples] == [(s.key, s.meta) for s in only_val]
    assert np.array_equal(np.asarray(wds_samples[0]["png"]), np.asarray(only_val[0].images["png"]))
    raw = next(iter(read_samples(tmp_path / "t2i", decode=False)))
    assert isinstance(raw.images["png"], bytes) and raw.images["png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_counts_and_checksums(tmp_path: Path) -> None:
    triples = _triples(10)
    m = write_shards(triples, tmp_path, "t2i", maxcount=3)
    assert m["n_samples"] == 10 and m["splits"] == {"train": 6, "val": 2, "test": 2}
    assert m["tags"] == {"counting": 5, "colors": 5}
    assert m["split_tags"]["val"] == {"counting": 2} and m["split_tags"]["train"] == {"counting": 3, "colors": 3}
    assert m["image_keys"] == ["png"]
    files = [tmp_path / s["file"] for s in m["shards"]]
    assert files == list_shards(tmp_path, "t2i")
    assert [p.name for p in files] == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    for s, p in zip(m["shards"], files):
        assert s["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and s["bytes"] == p.stat().st_size
        with tarfile.open(p) as tf:
            assert s["n_samples"] == len({n.name.split(".")[0] for n in tf.getmembers()})
    out = shards.write_manifest(tmp_path / "manifest.json", {"tasks": {"t2i": m}})
    assert json.loads(out.read_text())["tasks"]["t2i"] == m
    assert not list(tmp_path.glob(".*"))  # no temporary files or directories left behind


def test_same_input_gives_byte_identical_tars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_000_000, 2_000_000, 7))
    monkeypatch.setattr(wds.writer.time, "time", lambda: float(next(clock)))  # a clock that always moves
    a = write_shards(_triples(6), tmp_path / "a", "t2i", maxcount=4)
    b = write_shards(_triples(6), tmp_path / "b", "t2i", maxcount=4)
    assert a == b
    for s in a["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
        with tarfile.open(tmp_path / "a" / s["file"]) as tf:
            assert {m.mtime for m in tf.getmembers()} == {0}


def test_rewrite_replaces_task_dir_and_failure_keeps_old_set(tmp_path: Path) -> None:
    write_shards(_triples(9), tmp_path, "t2i", maxcount=2)
    assert len(list_shards(tmp_path, "t2i")) == 5
    write_shards(_triples(4), tmp_path, "t2i")
    assert [p.name for p in list_shards(tmp_path, "t2i")] == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]

    def failing():
        yield from _triples(3)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_shards(failing(), tmp_path, "t2i")
    assert sum(1 for _ in read_samples(tmp_path / "t2i")) == 4  # the previous complete set is untouched
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    ("triples", "match"),
    [
        ([("a.b", "train", _t2i(0))], "invalid sample key 'a.b'.*no dots"),
        ([("", "train", _t2i(0))], "invalid sample key ''"),
        ([("k1", "train", _t2i(0)), ("k1", "val", _t2i(1))], "duplicate sample key 'k1'"),
        ([("k1", "Train-x", _t2i(0))], "sample 'k1': invalid split name"),
        ([("k1", "train", Record("t2i", {"jpg": _img(0)}, {"tag": "x", "prompt": "p"}))], "'jpg' must be 'png'"),
    ],
)
def test_write_rejects_bad_keys_and_images(tmp_path: Path, triples, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_shards(triples, tmp_path, "t2i")
    assert not (tmp_path / "t2i").exists() and not list(tmp_path.glob(".*"))


def test_truncated_tar_names_file_and_key(tmp_path: Path) -> None:
    write_shards(_triples(6), tmp_path, "t2i")
    shard = tmp_path / "t2i" / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"train-000000\.tar.*truncated.*t2i_0\d{3}"):
        list(read_samples(tmp_path / "t2i"))
    with pytest.raises(ShardError, match=r"train-000000\.tar"):
        list(read_samples(tmp_path / "t2i", max_bad_fraction=0.5))  # structural damage is never skipped
    with pytest.raises(ShardError, match=r"train-000000\.tar"):
        metadata_table(tmp_path, "t2i")
    shard.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match=r"train-000000\.tar.*(corrupt|not a readable tar)"):
        list(read_samples(tmp_path / "t2i"))


def _corrupt_png() -> bytes:
    data = bytearray(_png(_img(7)))
    data[60:-20] = bytes(len(data) - 80)  # zero the compressed pixel data; header and chunk layout survive
    return bytes(data)


BAD_CASES = {
    "missing_json": ([("bad.png", _png(_img(5)))], "sample 'bad': no 'json' member"),
    "missing_image": ([("bad.json", json.dumps(_t2i(5).meta).encode())], "sample 'bad': missing required image"),
    "invalid_json": ([("bad.json", b"{not json"), ("bad.png", _png(_img(5)))], "sample 'bad': invalid JSON"),
    "wrong_size": (
        [("bad.json", json.dumps(_t2i(5).meta).encode()), ("bad.png", _png(_img(5, (RES + 4, RES))))],
        "sample 'bad': image 'png' is 20x16, expected 16x16",
    ),
    "undecodable_image": (
        [("bad.json", json.dumps(_t2i(5).meta).encode()), ("bad.png", _corrupt_png())],
        "sample 'bad': image 'png' does not decode",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_error_names_file_and_key(tmp_path: Path, case: str) -> None:
    bad_members, match = BAD_CASES[case]
    members = _good_members("ok0", 0) + bad_members + _good_members("ok1", 1)
    shard = _raw_tar(tmp_path / "t2i" / "train-000000.tar", members)
    with pytest.raises(ShardError, match=rf"{shard}: {match}"):
        list(read_samples(tmp_path / "t2i", resolution=RES))
    reader = read_samples(tmp_path / "t2i", resolution=RES, max_bad_fraction=0.4)
    assert [s.key for s in reader] == ["ok0", "ok1"]
    assert reader.stats.skipped == 1 and reader.stats.read == 2 and reader.stats.reasons == {case: 1}


def test_skip_up_to_fraction_then_fail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    members: list[tuple[str, bytes]] = []
    for i in range(10):
        members += [(f"s{i}.json", b"{broken")] if i == 4 else _good_members(f"s{i}", i)
        if i == 4:
            members.append(("s4.png", _png(_img(4))))
    _raw_tar(tmp_path / "t2i" / "train-000000.tar", members)
    with caplog.at_level(logging.WARNING, logger="unirl.data.shards"):
        reader = read_samples(tmp_path / "t2i", max_bad_fraction=0.1)
        keys = [s.key for s in reader]
    assert keys == [f"s{i}" for i in range(10) if i != 4]
    assert reader.stats.as_dict()["reasons"] == {"invalid_json": 1} and reader.stats.expected == 10
    assert reader.stats.bad_fraction == pytest.approx(0.1)
    assert "s4" in caplog.text and "skipping bad sample" in caplog.text
    with pytest.raises(ShardError, match=r"1 of 10 samples are bad \(10\.00% > max_bad_fraction 5\.00%\)"):
        list(read_samples(tmp_path / "t2i", max_bad_fraction=0.05))


def test_fails_early_when_bad_count_alone_exceeds_fraction(tmp_path: Path) -> None:
    members: list[tuple[str, bytes]] = []
    for i in range(20):
        members += [(f"s{i:02d}.png", _png(_img(i)))] if i < 3 else _good_members(f"s{i:02d}", i)
    _raw_tar(tmp_path / "t2i" / "train-000000.tar", members)
    reader = read_samples(tmp_path / "t2i", max_bad_fraction=0.1)  # 2 bad of 20 is allowed, the third is not
    got = []
    with pytest.raises(ShardError, match=r"3 of 20 samples are bad"):
        for s in reader:
            got.append(s.key)
    assert got == [] and reader.stats.skipped == 3 and reader.stats.reasons == {"missing_json": 3}


def test_list_shards_errors_and_task_mismatch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `unirl curate` first"):
        list_shards(tmp_path, "t2i", "train")
    write_shards(_triples(2), tmp_path, "t2i")
    with pytest.raises(FileNotFoundError, match="split 'val'.*run `unirl curate` first"):
        list_shards(tmp_path, "t2i", "val")
    (tmp_path / "edit").mkdir()
    (tmp_path / "t2i" / "train-000000.tar").rename(tmp_path / "edit" / "train-000000.tar")
    with pytest.raises(ShardError, match="meta task 't2i' != expected task 'edit'"):
        list(read_samples(tmp_path / "edit"))
