"""Importing image-caption WebDataset tars and editing parquet files that the tests write in those layouts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unirl.data.importers import ImportDataError, import_caption_tars, import_edit_parquet
from unirl.data.shard_writer import write_shards
from unirl.data.shards import read_samples

RES = 16
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _bands(w: int, h: int, vertical: bool) -> Image.Image:
    """Three bands red | green | blue (left to right, or top to bottom); the middle band is a centred square."""
    a = np.zeros((h, w, 3), dtype=np.uint8)  # (H, W, 3)
    if vertical:  # wide image: the middle h x h block is green
        a[:, : (w - h) // 2], a[:, (w - h) // 2 : (w + h) // 2], a[:, (w + h) // 2 :] = RED, GREEN, BLUE
    else:  # tall image
        a[: (h - w) // 2], a[(h - w) // 2 : (h + w) // 2], a[(h + w) // 2 :] = RED, GREEN, BLUE
    return Image.fromarray(a)


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _caption_tar(path: Path) -> Path:
    return _tar(
        path,
        [
            ("a.jpg", _bytes(_bands(48, 16, True), "JPEG")),
            ("a.txt", b"  a green\nsquare  "),
            ("b.json", json.dumps({"caption": "a tall green thing", "width": 32}).encode()),
            ("b.png", _bytes(_bands(32, 64, False), "PNG")),
            ("c.jpeg", _bytes(_bands(16, 16, True), "JPEG")),
            ("c.json", json.dumps({"text": "plain text field"}).encode()),
            ("d.png", _bytes(_bands(16, 48, False).convert("RGBA"), "PNG")),
            ("d.json", b'{"prompt": "from prompt"}'),
        ],
    )


def test_caption_tars_resize_crop_and_captions(tmp_path: Path) -> None:
    shard_dir = tmp_path / "src"
    shard_dir.mkdir()
    _caption_tar(shard_dir / "part-0.tar")
    recs = list(import_caption_tars(shard_dir, RES))
    assert [r.meta["prompt"] for r in recs] == [
        "a green square",
        "a tall green thing",
        "plain text field",
        "from prompt",
    ]
    for r, key in zip(recs, "abcd"):
        assert r.task == "t2i" and set(r.images) == {"png"}
        assert r.meta["tag"] == "caption" and r.meta["metadata"] is None and r.meta["resolution"] == RES
        assert r.meta["source"] == {"file": "part-0.tar", "key": key}
        img = r.images["png"]
        assert img.size == (RES, RES) and img.mode == "RGB"
    green = np.broadcast_to(np.uint8(GREEN), (RES, RES, 3))
    # d: 16x48 PNG (RGBA, opaque) needs no scaling: the centre crop is exactly the green band
    assert np.array_equal(np.asarray(recs[3].images["png"]), green)
    # b: 32x64 PNG is scaled to 16x32 (bicubic, support +-4 source rows), then rows 8..24 are kept; output rows
    # 2..13 see only green source rows 16..47, the edge rows blend in the red/blue bands
    out = np.asarray(recs[1].images["png"])
    assert np.array_equal(out[2:14], green[2:14])
    assert out[0, 0, 0] > 0 and out[-1, 0, 2] > 0
    # JPEG source: the crop is the green middle, up to compression error
    mean = np.asarray(recs[0].images["png"], dtype=float).mean(axis=(0, 1))
    assert mean[1] > 200 and mean[0] < 40 and mean[2] < 40


def test_imported_captions_round_trip_through_shards(tmp_path: Path) -> None:
    recs = list(import_caption_tars(_caption_tar(tmp_path / "c.tar"), RES))
    write_shards(((f"cap_{i:04d}", "train", r) for i, r in enumerate(recs)), tmp_path / "shards", "t2i")
    back = list(read_samples(tmp_path / "shards" / "t2i", "train", resolution=RES))
    assert [b.meta for b in back] == [r.meta for r in recs]
    for b, r in zip(back, recs):
        assert np.array_equal(np.asarray(b.images["png"]), np.asarray(r.images["png"]))


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([("k1.png", b"PNG?"), ("k1.txt", b"x")], r"bad\.tar: sample 'k1' \(png\): image does not decode"),
        ([("k1.png", None), ("k1.txt", b" \n ")], r"bad\.tar: sample 'k1': empty caption"),
        ([("k1.png", None)], r"bad\.tar: sample 'k1': no caption"),
        ([("k1.png", None), ("k1.json", b'{"alt": "x"}')], r"bad\.tar: sample 'k1': JSON has none of the caption"),
        ([("k1.png", None), ("k1.json", b"{oops")], r"bad\.tar: sample 'k1': invalid JSON"),
        ([("k1.txt", b"caption")], r"bad\.tar: sample 'k1': no image member"),
    ],
)
def test_caption_tar_bad_samples(tmp_path: Path, members, match: str) -> None:
    good = _bytes(_bands(16, 16, True), "PNG")
    path = _tar(
        tmp_path / "bad.tar",
        [("k0.png", good), ("k0.txt", b"fine")] + [(n, good if d is None else d) for n, d in members],
    )
    it = import_caption_tars(path, RES)
    assert next(it).meta["prompt"] == "fine"
    with pytest.raises(ImportDataError, match=match):
        next(it)


def test_caption_tar_truncated_and_missing(tmp_path: Path) -> None:
    path = _caption_tar(tmp_path / "cut.tar")
    path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(ImportDataError, match=r"cut\.tar.*truncated"):
        list(import_caption_tars(path, RES))
    with pytest.raises(ImportDataError, match="no such file"):
        list(import_caption_tars(tmp_path / "nope.tar", RES))


def _edit_table(src_name="source_image", tgt_name="edited_image", ins_name="instruction", bad_row=None) -> pa.Table:
    src = [_bytes(_bands(32, 16, True), "PNG"), _bytes(Image.new("RGB", (16, 16), RED), "PNG")]
    tgt = [
        {"bytes": _bytes(Image.new("RGB", (24, 24), BLUE), "PNG"), "path": "t0.png"},
        {"bytes": _bytes(Image.new("RGB", (16, 16), GREEN), "PNG"), "path": None},
    ]
    ins = ["make it blue", "  turn the   red square green "]
    if bad_row == "image":
        tgt[1] = {"bytes": b"\x89PNG broken", "path": None}
    elif bad_row == "instruction":
        ins[1] = "   "
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            src_name: pa.array(src, pa.binary()),
            tgt_name: pa.array(tgt, struct),
            ins_name: pa.array(ins),
            "other": pa.array([1, 2]),
        }
    )


def test_edit_parquet_records(tmp_path: Path) -> None:
    pq.write_table(_edit_table(), tmp_path / "edits.parquet")
    recs = list(import_edit_parquet(tmp_path / "edits.parquet", RES, batch_size=1))
    assert [r.meta["prompt"] for r in recs] == ["make it blue", "turn the red square green"]
    assert [r.meta["source"] for r in recs] == [{"file": "edits.parquet", "row": i} for i in (0, 1)]
    for r, (src, tgt) in zip(recs, [(GREEN, BLUE), (RED, GREEN)]):
        assert r.task == "edit" and r.meta["tag"] == "imported" and r.meta["metadata"] is None
        assert np.array_equal(np.asarray(r.images["src.png"]), np.broadcast_to(np.uint8(src), (RES, RES, 3)))
        assert np.array_equal(np.asarray(r.images["tgt.png"]), np.broadcast_to(np.uint8(tgt), (RES, RES, 3)))
    m = write_shards(((f"imp_{i}", "train", r) for i, r in enumerate(recs)), tmp_path / "shards", "edit")
    assert m["image_keys"] == ["src.png", "tgt.png"] and m["tags"] == {"imported": 2}


def test_edit_parquet_column_aliases_and_explicit_names(tmp_path: Path) -> None:
    pq.write_table(_edit_table("input_image", "output_image", "edit_prompt"), tmp_path / "a.parquet")
    assert len(list(import_edit_parquet(tmp_path, RES))) == 2  # a directory of parquet files
    pq.write_table(_edit_table("before", "after", "caption"), tmp_path / "b.parquet")
    with pytest.raises(ImportDataError, match=r"b\.parquet: no source column .*'before', 'after', 'caption'"):
        list(import_edit_parquet(tmp_path / "b.parquet", RES))
    recs = import_edit_parquet(
        tmp_path / "b.parquet", RES, source_column="before", target_column="after", instruction_column="caption"
    )
    assert len(list(recs)) == 2
    with pytest.raises(ImportDataError, match=r"b\.parquet: target column 'nope' not found"):
        list(import_edit_parquet(tmp_path / "b.parquet", RES, source_column="before", target_column="nope"))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("image", r"row 1 \(edited_image\): image does not decode"),
        ("instruction", r"row 1: empty or missing instruction"),
    ],
)
def test_edit_parquet_bad_rows(tmp_path: Path, bad: str, match: str) -> None:
    pq.write_table(_edit_table(bad_row=bad), tmp_path / "bad.parquet")
    it = import_edit_parquet(tmp_path / "bad.parquet", RES)
    assert next(it).meta["prompt"] == "make it blue"
    with pytest.raises(ImportDataError, match=rf"bad\.parquet: {match}"):
        next(it)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ImportDataError, match=r"junk\.parquet: not a readable parquet file"):
        list(import_edit_parquet(tmp_path / "junk.parquet", RES))
